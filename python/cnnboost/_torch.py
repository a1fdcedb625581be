"""What every torch module of cnnboost shares: turning tensors into the arrays the
kernels read (in place) and the kernels' arrays back into tensors (without a copy),
and the checks that give a bad argument a clear error before any work is done."""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from typing import Sequence

import numpy as np
import torch

from . import _gemm

SUPPORTED_DTYPES = (torch.float32, torch.float64)


_torch_threads = 0  # torch.get_num_threads() when the pool was last sized after it


def _follow_torch_threads() -> None:
    """Sizes the kernels' pool like torch's intra-op pool (torch counts physical
    cores where the OS reports logical ones), unless the user chose a size: at import,
    and again on the next call after ``torch.set_num_threads`` (a few hundred
    nanoseconds a call when nothing changed)."""
    global _torch_threads
    import cnnboost

    n = torch.get_num_threads()
    if n != _torch_threads and not cnnboost._threads_chosen:
        cnnboost._core.set_num_threads(max(1, n))
        _torch_threads = n


_follow_torch_threads()


_torch_ops_depth = 0


class torch_ops(contextlib.ContextDecorator):
    """Within it, cnnboost's modules compute with torch's own ops (the math of
    :mod:`cnnboost.reference`, on the same parameters and buffers) instead of the
    Rust kernels: slower, but every torch feature that needs torch ops works.

    Entered for you while ``torch.jit.trace`` or ``torch.onnx.export`` records a
    model (so the recorded graph holds the module's math in standard ops, not a
    call into the extension), under ``torch.func`` transforms (``vmap``,
    ``grad``, ``jacrev``, ...; their wrapped tensors have no memory the kernels
    could read), and inside ``torch.autograd.forward_ad.dual_level()`` (forward-mode
    AD, which the kernels do not implement). Tensors on a device cnnboost has no
    kernels for (see :func:`uses_torch_ops`) take that route too. Enter it yourself
    for:

    * double backward (``create_graph=True``: gradient penalties, Hessians, MAML):
      the kernels' backward is not differentiable, and differentiating it raises;
    * ``torch.export`` for a runtime without Python (AOTInductor, ExecuTorch),
      where the extension's custom ops cannot run;
    * modules converted to float16 or bfloat16 (the kernels compute in float32 and
      float64; ``torch.autocast`` needs none of this).

    Usable as ``with cnnboost.torch_ops(): ...`` or as a decorator. It affects the
    calls of every thread while any thread is inside it."""

    def __enter__(self):
        global _torch_ops_depth
        _torch_ops_depth += 1
        return self

    def __exit__(self, *exc) -> None:
        global _torch_ops_depth
        _torch_ops_depth -= 1


def refuse_scripting(module) -> None:
    """``__prepare_scriptable__`` of every cnnboost module: ``torch.jit.script`` would
    fail deep inside the module's Python with a message about type annotations."""
    raise RuntimeError(
        f"{type(module).__name__}: torch.jit.script cannot compile cnnboost's modules (they call a "
        "Python extension); torch.jit.trace records them in torch ops, as do torch.onnx.export and, "
        "inside cnnboost.torch_ops(), torch.export"
    )


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, without importing ``torch.onnx`` (31
    modules) on a module's first call when nothing exports."""
    if torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def torch_ops_active() -> bool:
    """Whether the modules compute with torch's ops now (see :class:`torch_ops`)."""
    return (
        _torch_ops_depth > 0
        or torch.jit.is_tracing()
        or _in_onnx_export()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0  # inside forward_ad.dual_level()
    )


class KernelOp:
    """One kernel op by two routes to the same implementation ``fn``: a
    ``torch.library`` custom op (``name``), which ``torch.compile`` and
    ``torch.export`` trace as one opaque op with a fake implementation and an
    autograd formula; and, in eager mode, a plain call, through a small
    ``autograd.Function`` when gradients flow. The custom op's dispatch costs
    0.4-0.7 ms an SSM training step (it flattens SSM's seven lists of tensors through
    pytrees, forward and backward; 0.05-0.15 ms for the other modules), a sixth of a
    small head's whole step; eager mode skips it.

    Used like the custom op it wraps: ``register_fake`` and ``register_autograd``
    register on it (the autograd formula serves both routes), and calling it runs
    the op. An op with an autograd formula returns one differentiable tensor, first;
    the outputs after it (statistics kept for the backward) are non-differentiable,
    and the formula takes no gradient for them (None, or zeros under the custom op)."""

    def __init__(self, name: str, fn):
        self.name = name
        self.impl = fn
        self.custom = torch.library.custom_op(name, mutates_args=())(fn)
        self._setup_context = None
        self._backward = None

    def register_fake(self, fn):
        return self.custom.register_fake(fn)

    def register_autograd(self, backward, *, setup_context) -> None:
        self.custom.register_autograd(backward, setup_context=setup_context)
        self._backward, self._setup_context = backward, setup_context

    def __call__(self, *inputs):
        if torch.compiler.is_compiling() or not _plain_tensors(inputs):
            return self.custom(*inputs)  # traced, or fake/meta tensors: the custom op handles them
        if self._backward is None or not (torch.is_grad_enabled() and _requires_grad(inputs)):
            return self.impl(*inputs)
        layout = tuple(len(v) if isinstance(v, list) else -1 for v in inputs)
        rest: list = []
        first = _EagerOp.apply(self, layout, rest, *_flatten(inputs, layout))
        return (first, *rest) if rest else first


def kernel_op(name: str):
    """Decorator: the function as a :class:`KernelOp` named ``name``."""
    return lambda fn: KernelOp(name, fn)


def _tensors(inputs):
    for v in inputs:
        if isinstance(v, list):
            yield from v
        elif isinstance(v, torch.Tensor):
            yield v


def _plain_tensors(inputs) -> bool:
    """Whether every tensor among the inputs is an ordinary CPU or CUDA tensor (not a
    fake, meta or other subclass tensor, which only the custom op knows how to take)."""
    return all(
        (type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and t.device.type in ("cpu", "cuda")
        for t in _tensors(inputs)
    )


def _requires_grad(inputs) -> bool:
    return any(t.requires_grad for t in _tensors(inputs))


def _flatten(values, layout):
    """One value per op argument (a list for a list argument, where None stands for a
    list of Nones) as the flat list :func:`_nest` takes apart."""
    flat = []
    for v, n in zip(values, layout):
        if n < 0:
            flat.append(v)
        else:
            flat.extend([None] * n if v is None else v)
    return flat


def _nest(flat, layout):
    """The op's arguments from :meth:`KernelOp.__call__`'s flat list (lists rebuilt)."""
    out, i = [], 0
    for n in layout:
        if n < 0:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i:i + n]))
            i += n
    return tuple(out)


class _EagerOp(torch.autograd.Function):
    """A :class:`KernelOp` in eager mode: its implementation forward, its registered
    autograd formula backward, with its arguments flattened so that autograd sees
    every tensor (lists of tensors included).

    ``forward`` takes ``ctx`` (the older form, without ``setup_context``): for the
    newer form torch binds the arguments with ``inspect.signature`` on every call,
    ~45 µs a call here. The newer form is only needed by ``torch.func`` transforms,
    which run the modules in torch's ops (:class:`torch_ops`) instead."""

    @staticmethod
    def forward(ctx, op, layout, rest, *flat):
        inputs = _nest(flat, layout)
        output = op.impl(*inputs)
        ctx.op, ctx.layout = op, layout
        op._setup_context(ctx, inputs, output)
        if not isinstance(output, tuple):
            ctx.rest = 0
            return output
        # Only the first output is differentiable (KernelOp's convention): the others
        # leave beside autograd, through `rest`, which spares autograd a node output
        # each (~25 µs apiece for AB's step with cold caches).
        rest.extend(output[1:])
        ctx.rest = len(output) - 1
        return output[0]

    @staticmethod
    def backward(ctx, grad):
        flat = _flatten(ctx.op._backward(ctx, grad, *[None] * ctx.rest), ctx.layout)
        if torch.is_grad_enabled():  # create_graph=True: these gradients may be differentiated
            flat = _not_differentiable(ctx.op.name, flat)
        return (None, None, None, *flat)


def _not_differentiable(name: str, grads):
    """The kernels' gradients with a node that raises if autograd ever reaches it
    (as ``torch.autograd.function.once_differentiable`` does, with a message that
    says what to do): differentiating them again would otherwise silently miss the
    second-order terms through this op."""
    tensors = [g for g in grads if isinstance(g, torch.Tensor)]
    if not tensors:
        return grads
    message = (
        f"{name}: the Rust kernels' backward cannot be differentiated (double backward, "
        "create_graph=True); run the forward inside `with cnnboost.torch_ops():` to compute "
        "it with torch's ops, which can"
    )
    err = torch._C._functions.DelayedError(message.encode(), len(tensors))
    wrapped = err(*[g.detach().requires_grad_() for g in tensors])
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    return [next(wrapped) if isinstance(g, torch.Tensor) else g for g in grads]


@kernel_op("cnnboost::expand_planes")
def expand_planes(values: torch.Tensor, hw: int, channels_last: bool) -> torch.Tensor:
    """``values`` ``[N, C]`` repeated over ``hw`` pixels: a new ``[N, C, hw]`` tensor
    (``[N, hw, C]`` when ``channels_last``)."""
    if values.device.type == "cpu":
        from . import _core

        return from_array(_core.expand_planes(to_array(values), hw, channels_last))
    if channels_last:
        return values[:, None, :].expand(values.shape[0], hw, values.shape[1]).contiguous()
    return values[:, :, None].expand(*values.shape, hw).contiguous()


@expand_planes.register_fake
def _(values, hw, channels_last):
    n, c = values.shape
    return values.new_empty((n, hw, c) if channels_last else (n, c, hw))


def pooling_grad(gx: torch.Tensor, shape: Sequence[int], stored: bool, channels_last: bool) -> torch.Tensor:
    """The gradient of an ``[N, C, H, W]`` input that was average-pooled, from its
    per-plane values ``gx`` ``[N, C]``: every pixel of a plane gets the same value;
    a ``channels_last`` map's gradient is ``channels_last`` too.

    A broadcast view costs nothing where the gradient flows on into another op; but
    the gradient of an input that torch stores (``stored``: a leaf that requires
    grad) must be a full tensor, and torch would clone the view into fresh pages. The
    kernels write that one faster (a reused buffer on huge pages, in parallel)."""
    if stored:
        n, c, h, w = shape
        if channels_last:
            return from_nhwc(expand_planes(gx, h * w, True).view(n, h, w, c))
        return expand_planes(gx, h * w, False).view(shape)
    return gx[:, :, None, None].expand(shape)


def grad_is_stored(x: torch.Tensor) -> bool:
    """Whether autograd will keep ``x``'s gradient in ``x.grad`` (a leaf that requires
    grad) rather than pass it on."""
    return x.requires_grad and x.is_leaf


# On Intel CPUs the products move to torch's MKL now (see cnnboost._gemm).
_gemm.choose_default(torch_loaded=True)


def to_array(t: torch.Tensor):
    """What the kernels read: a NumPy view of a CPU tensor (no copy; strides kept: the
    kernels copy only a layout they cannot read in place), or the CUDA tensor itself
    (read in place through DLPack; made contiguous first if it is not)."""
    if t.device.type == "cpu":
        return t.detach().numpy()
    return t.detach().contiguous()


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is a 4-d CPU map in torch's ``channels_last`` memory format (and
    not also plainly contiguous, as maps with one channel or one pixel are): the
    kernels then read and write it in that order (``[N, H, W, C]`` in memory) instead
    of copying it to ``[N, C, H, W]``."""
    return (
        t.dim() == 4
        and t.is_cpu
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    )


def map_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def to_nhwc(t: torch.Tensor) -> torch.Tensor:
    """A ``channels_last`` ``[N, C, H, W]`` map as the contiguous ``[N, H, W, C]`` view
    of its memory."""
    return t.permute(0, 2, 3, 1)


def from_nhwc(t: torch.Tensor) -> torch.Tensor:
    """A kernel's ``[N, H, W, C]`` result as the ``channels_last`` ``[N, C, H, W]`` map."""
    return t.permute(0, 3, 1, 2)


def map_to_array(t: torch.Tensor, channels_last: bool):
    """:func:`to_array` of a map, in its memory order when ``channels_last``."""
    return to_array(to_nhwc(t) if channels_last else t)


def map_from_array(a, channels_last: bool) -> torch.Tensor:
    """:func:`from_array` of a kernel's map, ``channels_last`` when it is one."""
    return from_nhwc(from_array(a)) if channels_last else from_array(a)


def from_array(a) -> torch.Tensor:
    """A kernel result as a tensor, without a copy: a NumPy array (CPU) or a DLPack
    capsule (CUDA)."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


CUDA_BUILD = "cnnboost_cuda"
_cuda_build: list = []  # [the CUDA build or None], once looked for


def _cuda_core():
    """The CUDA build of the extension (distribution ``cnnboost-cuda``), or None.
    Looked for once: a failed import would otherwise search ``sys.path`` on every call."""
    if not _cuda_build:
        try:
            _cuda_build.append(importlib.import_module(CUDA_BUILD))
        except ImportError:
            _cuda_build.append(None)
    return _cuda_build[0]


def has_kernels_for(device: torch.device) -> bool:
    """Whether cnnboost's kernels compute on ``device``: the CPU always, CUDA with the
    CUDA build installed."""
    return device.type == "cpu" or (device.type == "cuda" and _cuda_core() is not None)


def uses_torch_ops(t: torch.Tensor) -> bool:
    """Whether the modules compute on ``t`` with torch's ops (the math of
    :mod:`cnnboost.reference`) rather than the kernels: inside :class:`torch_ops` (or
    where it is entered for you), and for tensors on a device without kernels (a GPU
    without the CUDA build, ``meta``, ``mps``, ...). On a GPU that is also the faster
    route today: torch's ops ran 1.4-7x faster than the CUDA build on an H200
    (docs/performance.md, "GPU")."""
    return torch_ops_active() or not has_kernels_for(t.device)


def core_for(t: torch.Tensor):
    """The extension that computes on ``t``'s device: ``cnnboost._core`` for CPU
    tensors, the CUDA build for CUDA tensors. Before a CUDA call, torch's current
    stream is waited for (the CUDA build waits for its own work before returning), so
    the results are right on any stream."""
    if t.device.type == "cpu":
        from . import _core

        _follow_torch_threads()
        return _core
    core = _cuda_core()
    if core is None:
        raise ValueError(f"expected tensors on the CPU, got one on {t.device}: {NO_CUDA}")
    torch.cuda.current_stream(t.device).synchronize()
    return core


NO_CUDA = ("this installation of cnnboost has kernels for the CPU only; the modules compute CUDA tensors "
           "with torch's ops, and the CUDA build adds kernels for them (README, 'CUDA')")


def autocast_input(t: object, like: torch.Tensor) -> object:
    """Under ``torch.autocast`` a half-precision input is computed in the parameters'
    dtype (as torch's autocast does for layer and batch norm); outside autocast it is
    left alone, so that :func:`check_tensor` rejects it clearly."""
    if (
        isinstance(t, torch.Tensor)
        and t.dtype in (torch.float16, torch.bfloat16)
        and _autocast_enabled(t.device.type)
    ):
        return t.to(like.dtype)
    return t


def _autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for a device type autocast
    does not know (``meta``), where torch raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def check_tensor(
    name: str,
    t: object,
    *,
    ndims: Sequence[int],
    like: torch.Tensor | None = None,
    layout_doc: str = "",
) -> torch.Tensor:
    """Raises a TypeError/ValueError naming `name` unless `t` is a float32/float64
    tensor (any floating dtype where :func:`uses_torch_ops`) of one of the ranks in
    `ndims`, with the dtype and device of `like` (a parameter)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        ranks = " or ".join(f"{d}-d" for d in ndims)
        raise ValueError(f"{name}: expected a {ranks} tensor{layout_doc}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES and not (t.is_floating_point() and uses_torch_ops(t)):
        raise TypeError(
            f"{name}: expected dtype torch.float32 or torch.float64 (the Rust kernels' types), got "
            f"{t.dtype}; convert the module and its input with .float(), use torch.autocast for mixed "
            "precision, or compute in torch's ops, which take any floating dtype, inside "
            "`with cnnboost.torch_ops():`"
        )
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(
                f"{name}: expected dtype {like.dtype} (the module's parameters), got {t.dtype}; "
                f"call module.to({t.dtype}) or cast the input"
            )
        if t.device != like.device:
            raise ValueError(f"{name}: expected device {like.device} (the module's parameters), got {t.device}")
    return t


def check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def check_eps(value: object, name: str = "eps") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def check_momentum(value: object, name: str = "momentum") -> float | None:
    """A BatchNorm momentum: a number in [0, 1], or None (cumulative average)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1] or None, got {value!r}")
    return float(value)


def update_running_stats(bn: torch.nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    """What a torch BatchNorm does to its buffers in a training step, given the batch
    mean and the unbiased batch variance: count the batch, then move ``running_mean``
    and ``running_var`` towards them by ``bn.momentum`` (by ``1 / num_batches_tracked``,
    a cumulative average, when the momentum is None)."""
    update_running_stats_of([bn], [mean], [var])


def update_running_stats_of(bns, means, variances) -> None:
    """:func:`update_running_stats` for several batch norms at once, with torch's
    arithmetic and rounding: ``running · (1 − m) + batch · m``.

    In eager mode on CPU tensors with one momentum for all, in one call to the
    extension (``_core.update_running_stats``), which writes the buffers in place:
    ~0.2 ms less a step than torch's ops for a small AB (torch's dispatch, cold after
    a large kernel, costs more than the arithmetic); the buffers' version counters
    move as torch's in-place ops move them, so autograd still sees the change. Traced
    (``torch.compile``) or on a GPU, in four torch ops whatever the number of batch
    norms (one momentum for all, the usual case), or seven each."""
    momenta = {bn.momentum for bn in bns}
    if len(momenta) == 1 and not torch.compiler.is_compiling():
        buffers = [b for bn in bns for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
        tensors = buffers + [*means, *variances]
        if all(type(t) is torch.Tensor and t.device.type == "cpu" and not t.requires_grad for t in tensors):
            from . import _core

            arrays = [t.numpy() for t in tensors]
            k = len(bns)
            _core.update_running_stats(arrays[0:3 * k:3], arrays[1:3 * k:3], arrays[2:3 * k:3],
                                       arrays[3 * k:4 * k], arrays[4 * k:], momenta.pop())
            torch.autograd.graph.increment_version(buffers)
            return
    with torch.no_grad():
        counts = [bn.num_batches_tracked for bn in bns]
        torch._foreach_add_(counts, 1)
        if len(momenta) == 1 and None not in momenta:
            m = momenta.pop()
            running = [b for bn in bns for b in (bn.running_mean, bn.running_var)]
            batch = [t for pair in zip(means, variances) for t in pair]
            torch._foreach_mul_(running, 1 - m)
            torch._foreach_add_(running, torch._foreach_mul(batch, m))
            return
        for bn, mean, var in zip(bns, means, variances):
            if bn.momentum is None:
                factor = 1.0 / bn.num_batches_tracked.to(mean.dtype)
            else:
                factor = bn.momentum
            bn.running_mean.mul_(1 - factor).add_(mean * factor)
            bn.running_var.mul_(1 - factor).add_(var * factor)


def sync_active(sync_bn: bool, training: bool, process_group) -> bool:
    """Whether batch statistics must be reduced across processes: asked for, in
    training, and torch.distributed runs with more than one process in the group."""
    if not (sync_bn and training):
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def synced_batch_norm(t: torch.Tensor, bn: torch.nn.modules.batchnorm._BatchNorm, process_group) -> torch.Tensor:
    """Training-mode BatchNorm of ``t`` ``[N, C]`` with the batch statistics of every
    process in the group, as torch's SyncBatchNorm computes them (which runs on GPUs
    only), through differentiable all-reduces; then the running update from them."""
    from torch.distributed.nn.functional import all_reduce

    count = all_reduce(t.new_tensor([float(t.shape[0])]), group=process_group)
    mean = all_reduce(t.sum(0), group=process_group) / count
    var = all_reduce((t - mean).square().sum(0), group=process_group) / count
    out = (t - mean) * torch.rsqrt(var + bn.eps) * bn.weight + bn.bias
    update_running_stats(bn, mean.detach(), (var * count / (count - 1)).detach())
    return out
