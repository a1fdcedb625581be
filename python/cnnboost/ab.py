"""AB — Accuracy Booster block, on the Rust kernels (custom ops ``cnnboost::ab_forward``
and ``cnnboost::ab_backward``; ``_torch.KernelOp``)."""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _core
from . import reference
from ._torch import autocast_input, core_for, check_bool, check_eps, check_int, check_momentum, sync_active, synced_batch_norm, check_tensor, from_array, is_channels_last, kernel_op, map_format, map_from_array, map_to_array, refuse_scripting, to_array, uses_torch_ops, update_running_stats

__all__ = ["AB"]


@functools.lru_cache(maxsize=64)
def _kernels(core, channels: int, groups: int, eps: float) -> _core.AB:
    return core.AB(channels, groups, eps)


def _np(t: Optional[Tensor]):
    return None if t is None else to_array(t)


@kernel_op("cnnboost::ab_forward")
def ab_forward(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    groups: int,
    eps: float,
    training: bool,
    channels_last: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, pooled, mean, invstd, var_unbiased); var_unbiased is empty in eval.
    ``channels_last``: ``x`` is a CPU ``channels_last`` map, read (and ``out`` written)
    in that memory order."""
    k = _kernels(core_for(x), x.shape[1], groups, eps)
    out, *rest = k.forward(
        map_to_array(x, channels_last), to_array(conv_weight), _np(conv_bias), to_array(bn_weight),
        to_array(bn_bias), to_array(running_mean), to_array(running_var), training, channels_last,
    )
    return (map_from_array(out, channels_last), *(from_array(a) for a in rest))  # type: ignore[return-value]


@ab_forward.register_fake
def _(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, groups, eps, training, channels_last):
    n, c = x.shape[0], x.shape[1]
    return (
        torch.empty_like(x, memory_format=map_format(channels_last)),
        x.new_empty((n, c)),
        x.new_empty((c,)),
        x.new_empty((c,)),
        x.new_empty((c,) if training else (0,)),
    )


@kernel_op("cnnboost::ab_backward")
def ab_backward(
    grad_out: Tensor,
    x: Tensor,
    pooled: Tensor,
    mean: Tensor,
    invstd: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    bn_weight: Tensor,
    bn_bias: Tensor,
    groups: int,
    eps: float,
    training: bool,
    channels_last: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_conv_weight, grad_conv_bias (empty without a bias),
    grad_bn_weight, grad_bn_bias); ``grad_out`` and ``x`` in the forward's layout."""
    k = _kernels(core_for(x), x.shape[1], groups, eps)
    gx, *rest = k.backward(
        map_to_array(grad_out, channels_last), map_to_array(x, channels_last), to_array(pooled), to_array(mean), to_array(invstd),
        to_array(conv_weight), _np(conv_bias), to_array(bn_weight), to_array(bn_bias), training, channels_last,
    )
    return (map_from_array(gx, channels_last), *(from_array(a) for a in rest))  # type: ignore[return-value]


@ab_backward.register_fake
def _(grad_out, x, pooled, mean, invstd, conv_weight, conv_bias, bn_weight, bn_bias, groups, eps, training,
      channels_last):
    return (
        torch.empty_like(x, memory_format=map_format(channels_last)),
        torch.empty_like(conv_weight),
        x.new_empty((x.shape[1],) if conv_bias is not None else (0,)),
        torch.empty_like(bn_weight),
        torch.empty_like(bn_bias),
    )


def _setup_context(ctx, inputs, output):
    x, conv_weight, conv_bias, bn_weight, bn_bias, _, _, groups, eps, training, channels_last = inputs
    _, pooled, mean, invstd, _ = output
    ctx.save_for_backward(x, pooled, mean, invstd, conv_weight, conv_bias, bn_weight, bn_bias)
    ctx.config = (groups, eps, training, channels_last)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_out, *_):
    x, pooled, mean, invstd, conv_weight, conv_bias, bn_weight, bn_bias = ctx.saved_tensors
    grad_out = grad_out.contiguous(memory_format=map_format(ctx.config[-1]))
    gx, gw, gb, gbw, gbb = ab_backward(grad_out, x, pooled, mean, invstd, conv_weight, conv_bias,
                                       bn_weight, bn_bias, *ctx.config)
    return gx, gw, (gb if conv_bias is not None else None), gbw, gbb, None, None, None, None, None, None


ab_forward.register_autograd(_backward, setup_context=_setup_context)


class AB(nn.Module):
    r"""Accuracy Booster block: channel recalibration of a feature map.

    ``y = GAP(x)``; ``t = Conv1x1(y, groups)``; ``p = sigmoid(BatchNorm(t))``;
    ``out = p[:, :, None, None] * x``. ``groups=None`` (default) is the depthwise
    AB block; ``groups=1`` is AB-Plus; any divisor of ``channels`` works (the
    paper's Table 15). The convolution has no bias by default (BatchNorm follows).

    BatchNorm is torch's: batch statistics and a running update (``momentum``,
    unbiased variance; ``momentum=None`` is a cumulative average) in training, the
    running statistics in eval. A call that raises changes no parameter, buffer or
    counter (torch bumps ``num_batches_tracked`` before it rejects a batch of one).
    ``sync_bn=True`` (or :func:`cnnboost.convert_sync_batchnorm`) reduces the batch
    statistics across the processes of ``process_group`` under torch.distributed,
    like torch's SyncBatchNorm (which runs on GPUs only); that path runs in torch ops.

    Submodules ``conv`` (``nn.Conv2d(C, C, 1, groups)``) and ``bn``
    (``nn.BatchNorm2d(C)``) hold the parameters, so the state_dict keys are
    ``conv.weight`` ``[C, C/groups, 1, 1]``, ``conv.bias``, ``bn.{weight, bias,
    running_mean, running_var, num_batches_tracked}``.

    Example: insert into a residual block before the sum::

        block.bn2 = nn.Sequential(block.bn2, cnnboost.AB(block.bn2.num_features))
    """

    def __init__(self, channels: int, groups: Optional[int] = None, bias: bool = False, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, sync_bn: bool = False, process_group=None,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.sync_bn = check_bool("sync_bn", sync_bn)
        self.process_group = process_group
        self.channels = check_int("channels", channels, minimum=1)
        g = channels if groups is None else check_int("groups", groups, minimum=1)
        if channels % g:
            raise ValueError(f"groups: expected a divisor of channels = {channels} (or None), got {g}")
        self.groups = g
        eps = check_eps(eps)
        momentum = check_momentum(momentum)
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(channels, channels, 1, groups=g, bias=bias, **factory)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, **factory)

    def forward(self, x: Tensor) -> Tensor:
        x = autocast_input(x, self.bn.weight)
        check_tensor("x", x, ndims=(4,), like=self.bn.weight, layout_doc=" [N, C, H, W]")
        if x.shape[1] != self.channels:
            raise ValueError(f"x: expected {self.channels} channels in dim 1, got shape {tuple(x.shape)}")
        if x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"x: expected a non-empty H×W plane, got shape {tuple(x.shape)}")
        if self.training and x.shape[0] < 2:
            raise ValueError(f"x: expected more than 1 sample in training (batch statistics), got shape {tuple(x.shape)}")
        bn = self.bn
        if sync_active(self.sync_bn, self.training, self.process_group):
            # Batch statistics over every process: the small [N, C] part in torch ops
            # around differentiable all-reduces, the map scaled by torch too.
            t = self.conv(x.mean((2, 3), keepdim=True)).flatten(1)
            gate = torch.sigmoid(synced_batch_norm(t, bn, self.process_group))
            return x * gate[:, :, None, None]
        if uses_torch_ops(x):
            return reference.AB.forward(self, x)
        out, _, mean, _, var = ab_forward(x, self.conv.weight, self.conv.bias, bn.weight, bn.bias,
                                          bn.running_mean, bn.running_var, self.groups, bn.eps, self.training,
                                          is_channels_last(x))
        if self.training:
            update_running_stats(bn, mean, var)
        return out

    __prepare_scriptable__ = refuse_scripting

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
