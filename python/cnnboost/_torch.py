"""What every torch module of cnnboost shares: turning tensors into the arrays the
kernels read (in place) and the kernels' arrays back into tensors (without a copy),
and the checks that give a bad argument a clear error before any work is done."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _follow_torch_threads() -> None:
    """Sizes the kernels' pool like torch's intra-op pool (torch counts physical
    cores where the OS reports logical ones), unless the user chose a size."""
    import cnnboost

    if not cnnboost._threads_chosen:
        cnnboost._core.set_num_threads(max(1, torch.get_num_threads()))


_follow_torch_threads()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (no copy; strides kept: the kernels copy only a
    layout they cannot read in place)."""
    return t.detach().numpy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def autocast_input(t: object, like: torch.Tensor) -> object:
    """Under ``torch.autocast`` a half-precision input is computed in the parameters'
    dtype (as torch's autocast does for layer and batch norm); outside autocast it is
    left alone, so that :func:`check_tensor` rejects it clearly."""
    if (
        isinstance(t, torch.Tensor)
        and t.dtype in (torch.float16, torch.bfloat16)
        and torch.is_autocast_enabled(t.device.type)
    ):
        return t.to(like.dtype)
    return t


def check_tensor(
    name: str,
    t: object,
    *,
    ndims: Sequence[int],
    like: torch.Tensor | None = None,
    layout_doc: str = "",
) -> torch.Tensor:
    """Raises a TypeError/ValueError naming `name` unless `t` is a floating CPU tensor
    of one of the ranks in `ndims`, with the dtype and device of `like` (a parameter)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        ranks = " or ".join(f"{d}-d" for d in ndims)
        raise ValueError(f"{name}: expected a {ranks} tensor{layout_doc}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected dtype torch.float32 or torch.float64, got {t.dtype} "
            "(cast the input, or run the module outside torch.autocast)"
        )
    if t.device.type != "cpu":
        raise ValueError(
            f"{name}: expected a tensor on the CPU, got one on {t.device} "
            "(this build of cnnboost has CPU kernels only)"
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
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
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
