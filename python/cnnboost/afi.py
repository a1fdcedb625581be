"""AFI — Attentive Feature Integration, on the Rust kernels (custom ops
``cnnboost::afi_forward`` and ``cnnboost::afi_backward``; ``_torch.KernelOp``)."""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _core, reference
from ._torch import (autocast_input, core_for, check_int, check_tensor, from_array, is_channels_last, kernel_op,
                     map_format, map_from_array, map_to_array, refuse_scripting, to_array, uses_torch_ops)

__all__ = ["AFI"]


@functools.lru_cache(maxsize=64)
def _kernels(core, channels: int, reduction: int) -> _core.AFI:
    return core.AFI(channels, reduction)


def _np(t: Optional[Tensor]):
    return None if t is None else to_array(t)


@kernel_op("cnnboost::afi_forward")
def afi_forward(
    xs: List[Tensor],
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    reduction: int,
    channels_last: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (fused, z, hidden, weights); the last three are kept for backward.
    ``channels_last``: every map is a CPU ``channels_last`` map, read (and the fused
    map written) in that memory order."""
    out, *rest = _kernels(core_for(fc1_weight), fc1_weight.shape[1], reduction).forward(
        [map_to_array(x, channels_last) for x in xs], to_array(fc1_weight), _np(fc1_bias),
        to_array(fc2_weight), _np(fc2_bias), channels_last,
    )
    return (map_from_array(out, channels_last), *(from_array(a) for a in rest))  # type: ignore[return-value]


@afi_forward.register_fake
def _(xs, fc1_weight, fc1_bias, fc2_weight, fc2_bias, reduction, channels_last):
    x = xs[0]
    m, n, c, hidden = len(xs), x.shape[0], x.shape[1], fc1_weight.shape[0]
    return (
        torch.empty_like(x, memory_format=map_format(channels_last)),
        x.new_empty((m, n, c)),
        x.new_empty((m, n, hidden)),
        x.new_empty((m, n, c)),
    )


@kernel_op("cnnboost::afi_backward")
def afi_backward(
    grad_out: Tensor,
    xs: List[Tensor],
    z: Tensor,
    hidden: Tensor,
    weights: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    reduction: int,
    channels_last: bool,
) -> List[Tensor]:
    """Returns [grad_x_1 … grad_x_M, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight,
    grad_fc2_bias] (a bias gradient is empty when the bias is None); ``grad_out`` and
    ``xs`` in the forward's layout."""
    gxs, gw1, gb1, gw2, gb2 = _kernels(core_for(fc1_weight), fc1_weight.shape[1], reduction).backward(
        map_to_array(grad_out, channels_last), [map_to_array(x, channels_last) for x in xs], to_array(z), to_array(hidden), to_array(weights),
        to_array(fc1_weight), _np(fc1_bias), to_array(fc2_weight), _np(fc2_bias), channels_last,
    )
    return [map_from_array(g, channels_last) for g in gxs] + [from_array(a) for a in (gw1, gb1, gw2, gb2)]


@afi_backward.register_fake
def _(grad_out, xs, z, hidden, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, reduction, channels_last):
    empty = grad_out.new_empty((0,))
    return [torch.empty_like(x, memory_format=map_format(channels_last)) for x in xs] + [
        torch.empty_like(fc1_weight),
        torch.empty_like(fc1_bias) if fc1_bias is not None else empty,
        torch.empty_like(fc2_weight),
        torch.empty_like(fc2_bias) if fc2_bias is not None else empty,
    ]


def _setup_context(ctx, inputs, output):
    xs, fc1_weight, fc1_bias, fc2_weight, fc2_bias, reduction, channels_last = inputs
    _, z, hidden, weights = output
    ctx.m = len(xs)
    ctx.reduction = reduction
    ctx.channels_last = channels_last
    ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)
    ctx.save_for_backward(*xs, z, hidden, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    ctx.mark_non_differentiable(z, hidden, weights)


def _backward(ctx, grad_out, *_):
    saved = ctx.saved_tensors
    xs, (z, hidden, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias) = list(saved[: ctx.m]), saved[ctx.m:]
    grad_out = grad_out.contiguous(memory_format=map_format(ctx.channels_last))
    grads = afi_backward(grad_out, xs, z, hidden, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                         ctx.reduction, ctx.channels_last)
    gxs, (gw1, gb1, gw2, gb2) = grads[: ctx.m], grads[ctx.m:]
    return (list(gxs), gw1, gb1 if ctx.has_bias[0] else None, gw2, gb2 if ctx.has_bias[1] else None, None, None)


afi_forward.register_autograd(_backward, setup_context=_setup_context)


class AFI(nn.Module):
    r"""Attentive Feature Integration: fuses M ≥ 1 same-shape feature maps.

    ``z_i = GAP(X_i)``; ``s_i = fc2(ReLU(fc1(z_i)))`` (one scorer shared by every
    map); ``w = softmax over i`` per sample and channel; ``R = Σ_i w_i · X_i``.
    Called as ``afi(xs)`` with a list or tuple of ``[N, C, H, W]`` tensors; the same
    module takes a different M on the next call (block i of a stage fuses the i−1
    earlier outputs). The inputs are read where they lie, never stacked.

    ``reduction`` r: the scorer's hidden size is ``channels // r`` (4 in the
    AFI-Network, 16 in the "-B" setting). Scorer biases are off by default.
    Parameters: ``fc1.weight`` ``[C/r, C]``, ``fc2.weight`` ``[C, C/r]`` (and
    ``fc1.bias``, ``fc2.bias`` with ``bias=True``).

    Example::

        fused = cnnboost.AFI(256)([out1, out2, out3])
    """

    def __init__(self, channels: int, reduction: int = 4, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = check_int("channels", channels, minimum=1)
        self.reduction = check_int("reduction", reduction, minimum=1)
        if reduction > channels:
            raise ValueError(f"reduction: expected an int in [1, channels = {channels}], got {reduction}")
        hidden = channels // reduction
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(channels, hidden, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden, channels, bias=bias, **factory)

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"xs: expected a list or tuple of [N, C, H, W] tensors, got {type(xs).__name__}")
        if len(xs) == 0:
            raise ValueError("xs: expected at least one feature map, got an empty list")
        like = self.fc1.weight
        xs = [autocast_input(x, like) for x in xs]
        for i, x in enumerate(xs):
            check_tensor(f"xs[{i}]", x, ndims=(4,), like=like, layout_doc=" [N, C, H, W]")
        first = xs[0]
        if first.shape[1] != self.channels:
            raise ValueError(f"xs[0]: expected {self.channels} channels in dim 1, got shape {tuple(first.shape)}")
        if first.shape[2] * first.shape[3] == 0:
            raise ValueError(f"xs[0]: expected a non-empty H×W plane, got shape {tuple(first.shape)}")
        for i, x in enumerate(xs[1:], 1):
            if x.shape != first.shape:
                raise ValueError(f"xs[{i}]: expected shape {tuple(first.shape)} (that of xs[0]), got {tuple(x.shape)}")
        if uses_torch_ops(first):
            return reference.AFI.forward(self, xs)
        out, _, _, _ = afi_forward(list(xs), self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                   self.reduction, all(is_channels_last(x) for x in xs))
        return out

    __prepare_scriptable__ = refuse_scripting

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, bias={self.fc1.bias is not None}"
