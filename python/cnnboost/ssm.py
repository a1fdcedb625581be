"""SSM — Split-and-Share Module, on the Rust kernels.

The kernels are registered as torch custom ops (``cnnboost::ssm_forward``,
``cnnboost::ssm_backward``) with fake implementations and an autograd formula, so
autograd, ``torch.compile`` and ``torch.export`` see one op (in eager mode they are
called without the custom op's dispatch: ``_torch.KernelOp``). The forward op is
functional: it returns the batch statistics, and the module updates the BatchNorms'
running statistics itself, after the op returned.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import torch
from torch import Tensor, nn

from . import _core, reference
from ._torch import (
    autocast_input,
    core_for,
    check_bool,
    check_choice,
    check_eps,
    check_int,
    check_momentum,
    check_tensor,
    from_array,
    grad_is_stored,
    is_channels_last,
    kernel_op,
    map_to_array,
    pooling_grad,
    sync_active,
    synced_batch_norm,
    refuse_scripting,
    to_array,
    uses_torch_ops,
    update_running_stats_of,
)

__all__ = ["SSM"]

OUTPUTS = ("ensemble", "all")


@functools.lru_cache(maxsize=64)
def _kernels(core, num_heads: int, norm_last_head: bool, eps: float) -> _core.SSM:
    return core.SSM(num_heads, norm_last_head, eps)


def _arrays(ts: List[Tensor]) -> list:
    return [to_array(t) for t in ts]


@kernel_op("cnnboost::ssm_forward")
def ssm_forward(
    x: Tensor,
    fc_weights: List[Tensor],
    fc_biases: List[Tensor],
    bn_weights: List[Tensor],
    bn_biases: List[Tensor],
    running_means: List[Tensor],
    running_vars: List[Tensor],
    norm_last_head: bool,
    eps: float,
    training: bool,
    all_outputs: bool,
    channels_last: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (logits, mean, invstd, var, pooled). mean/invstd: what normalised each
    normalised head, concatenated head after head (batch statistics in training,
    running ones in eval); var: the unbiased batch variance in training (empty in
    eval); pooled: the [N, C] average of a 4-d x (empty for a 2-d x, its own)."""
    k = _kernels(core_for(fc_weights[0]), len(fc_weights), norm_last_head, eps)
    arrays = k.forward(
        map_to_array(x, channels_last),
        _arrays(fc_weights),
        _arrays(fc_biases),
        _arrays(bn_weights),
        _arrays(bn_biases),
        _arrays(running_means),
        _arrays(running_vars),
        training,
        "all" if all_outputs else "ensemble",
        channels_last,
    )
    return tuple(from_array(a) for a in arrays)  # type: ignore[return-value]


@ssm_forward.register_fake
def _(x, fc_weights, fc_biases, bn_weights, bn_biases, running_means, running_vars,
      norm_last_head, eps, training, all_outputs, channels_last):
    n, c, g, k = x.shape[0], x.shape[1], len(fc_weights), fc_weights[0].shape[0]
    stats = sum(w.shape[0] for w in bn_weights)
    return (
        x.new_empty((g, n, k) if all_outputs else (n, k)),
        x.new_empty((stats,)),
        x.new_empty((stats,)),
        x.new_empty((stats if training else 0,)),
        x.new_empty((n, c) if x.dim() == 4 else (0,)),
    )


@kernel_op("cnnboost::ssm_backward")
def ssm_backward(
    grad_out: Tensor,
    pooled: Tensor,
    mean: Tensor,
    invstd: Tensor,
    fc_weights: List[Tensor],
    fc_biases: List[Tensor],
    bn_weights: List[Tensor],
    bn_biases: List[Tensor],
    hw: int,
    norm_last_head: bool,
    eps: float,
    training: bool,
    all_outputs: bool,
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """Returns (grad_x per plane [N, C], grad_fc_weights, grad_fc_biases,
    grad_bn_weights, grad_bn_biases); the activations are recomputed from the pooled
    [N, C] input and the saved statistics."""
    k = _kernels(core_for(fc_weights[0]), len(fc_weights), norm_last_head, eps)
    gx, gfw, gfb, gbw, gbb = k.backward(
        to_array(grad_out),
        to_array(pooled),
        to_array(mean),
        to_array(invstd),
        _arrays(fc_weights),
        _arrays(fc_biases),
        _arrays(bn_weights),
        _arrays(bn_biases),
        hw,
        training,
        "all" if all_outputs else "ensemble",
    )
    tensors = lambda arrays: [from_array(a) for a in arrays]  # noqa: E731
    return from_array(gx), tensors(gfw), tensors(gfb), tensors(gbw), tensors(gbb)


@ssm_backward.register_fake
def _(grad_out, pooled, mean, invstd, fc_weights, fc_biases, bn_weights, bn_biases, hw,
      norm_last_head, eps, training, all_outputs):
    like = lambda ts: [torch.empty_like(t) for t in ts]  # noqa: E731
    return torch.empty_like(pooled), like(fc_weights), like(fc_biases), like(bn_weights), like(bn_biases)


def _setup_context(ctx, inputs, output):
    x, fc_weights, fc_biases, bn_weights, bn_biases, _, _, norm_last_head, eps, training, all_outputs, channels_last = (
        inputs)
    _, mean, invstd, var, pooled = output
    ctx.save_for_backward(
        x if x.dim() == 2 else pooled, mean, invstd, *fc_weights, *fc_biases, *bn_weights, *bn_biases
    )
    ctx.counts = (len(fc_weights), len(bn_weights))
    ctx.x_shape = x.shape
    ctx.grad_stored = grad_is_stored(x)
    ctx.channels_last = channels_last
    ctx.config = (norm_last_head, eps, training, all_outputs)
    ctx.mark_non_differentiable(mean, invstd, var, pooled)


def _backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_var, _grad_pooled):
    pooled, mean, invstd, *params = ctx.saved_tensors
    g, h = ctx.counts
    fc_weights, fc_biases = params[:g], params[g:2 * g]
    bn_weights, bn_biases = params[2 * g:2 * g + h], params[2 * g + h:]
    shape = ctx.x_shape
    hw = shape[2] * shape[3] if len(shape) == 4 else 1
    gx, gfw, gfb, gbw, gbb = ssm_backward(
        grad_out.contiguous(), pooled, mean, invstd, fc_weights, fc_biases, bn_weights, bn_biases, hw, *ctx.config
    )
    if len(shape) == 4:
        gx = pooling_grad(gx, shape, ctx.grad_stored, ctx.channels_last)
    # The running statistics (read in eval) and the options get no gradient.
    return gx, gfw, gfb, gbw, gbb, [None] * h, [None] * h, None, None, None, None, None


ssm_forward.register_autograd(_backward, setup_context=_setup_context)


class SSM(nn.Module):
    r"""Split-and-Share Module (SSM), a drop-in classifier head.

    The feature ``x`` (``[N, C]``, or an ``[N, C, H, W]`` map averaged over H×W
    inside) is split into ``G = num_heads`` parts of ``n = C / G`` channels; head
    ``i`` (1-based) classifies the first ``i`` parts, so the parts are shared:

    * ``p_i = x[:, :i·n]``;
    * ``a_i = ReLU(BatchNorm1d_i(p_i))`` for ``i < G``; ``a_G = p_G`` — the full
      feature, raw (the paper's text). ``norm_last_head=True`` gives head G its
      BatchNorm + ReLU too (the paper's Algorithm 1);
    * ``logits_i = Linear_i(a_i)`` (``i·n → K``, with bias).

    ``forward`` returns, in training and in eval alike, ``outputs="ensemble"``
    (default): the mean ``(1/G) Σ_i logits_i``, ``[N, K]``; ``outputs="all"``: the
    per-head logits stacked, ``[G, N, K]``, differentiable (the paper's
    "individual" training scheme: one loss per head).

    Submodules, named like torch ModuleLists so that ``state_dict`` keys read
    ``bns.{i}.{weight,bias,running_mean,running_var,num_batches_tracked}`` and
    ``fcs.{i}.{weight,bias}`` (0-based): ``bns`` holds a real ``nn.BatchNorm1d`` for
    each normalised head (``G - 1`` of them, or ``G`` with ``norm_last_head``),
    ``fcs`` an ``nn.Linear`` for every head. ``cnnboost.reference.SSM`` has the same
    names, so checkpoints move between the two.

    Choices where the paper is silent:

    * BatchNorm as in torch: batch statistics (biased variance) in training, running
      statistics in eval; ``running_var`` gets the unbiased batch variance; ``momentum``
      0.1 by default, ``None`` for a cumulative average. Every head's BatchNorm keeps
      its own running statistics. The update happens after the kernels returned, so a
      call that raises changes nothing.
    * The mode is this module's ``training`` flag (``train()``/``eval()`` set the
      BatchNorms' flags too). ``eps`` is this module's, for every head;
      ``momentum`` is each BatchNorm's own (``ssm.bns[i].momentum = …`` works as on
      any BatchNorm).
    * Training needs a batch of at least 2 when any head is normalised: a batch of 1
      (or 0) raises ``ValueError`` as torch's BatchNorm does, and counts no batch.
      Eval takes any batch size, 0 included.
    * float32 or float64 like the parameters; under ``torch.autocast`` a
      float16/bfloat16 input is computed in the parameters' dtype (as autocast does
      for normalisation layers); outside autocast it raises a TypeError.
    * ``sync_bn=True`` (or :func:`cnnboost.convert_sync_batchnorm`) reduces each
      head's batch statistics across the processes of ``process_group`` under
      torch.distributed, like torch's SyncBatchNorm (GPU-only in torch); that path
      runs in torch ops.

    Example::

        model.fc = cnnboost.SSM(model.fc.in_features, model.fc.out_features)   # ResNet
        head = cnnboost.SSM(2048, 1000, num_heads=4, outputs="all")
        loss = sum(F.cross_entropy(logits, y) for logits in head(features))  # per head
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_heads: int = 4,
        norm_last_head: bool = False,
        outputs: str = "ensemble",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        sync_bn: bool = False,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.sync_bn = check_bool("sync_bn", sync_bn)
        self.process_group = process_group
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        if in_features % num_heads:
            raise ValueError(
                f"in_features: expected a multiple of num_heads = {num_heads}, got {in_features}"
            )
        self.norm_last_head = check_bool("norm_last_head", norm_last_head)
        self.outputs = check_choice("outputs", outputs, OUTPUTS)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        factory = {"device": device, "dtype": dtype}
        split = in_features // num_heads
        normalised = num_heads if norm_last_head else num_heads - 1
        self.bns = nn.ModuleList(
            nn.BatchNorm1d((i + 1) * split, eps=self.eps, momentum=self.momentum, **factory)
            for i in range(normalised)
        )
        self.fcs = nn.ModuleList(nn.Linear((i + 1) * split, num_classes, **factory) for i in range(num_heads))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.fcs[0].weight
        x = autocast_input(x, weight)
        check_tensor("x", x, ndims=(2, 4), like=weight, layout_doc=" [N, C] or [N, C, H, W]")
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"x: expected {self.in_features} channels (in_features) in dim 1, got shape {tuple(x.shape)}"
            )
        if self.training and len(self.bns) > 0 and x.shape[0] < 2:
            raise ValueError(
                "x: expected more than 1 value per channel when training (a batch of at least 2 "
                f"for the batch norms), got input size {tuple(x.shape)}"
            )
        if sync_active(self.sync_bn, self.training, self.process_group) and len(self.bns) > 0:
            return self._forward_synced(x)
        if uses_torch_ops(x):
            return reference.SSM.forward(self, x)
        out, mean, _, var, _ = ssm_forward(
            x,
            [fc.weight for fc in self.fcs],
            [fc.bias for fc in self.fcs],
            [bn.weight for bn in self.bns],
            [bn.bias for bn in self.bns],
            [bn.running_mean for bn in self.bns],
            [bn.running_var for bn in self.bns],
            self.norm_last_head,
            self.eps,
            self.training,
            self.outputs == "all",
            is_channels_last(x),
        )
        if self.training and len(self.bns) > 0:
            widths = [bn.num_features for bn in self.bns]
            update_running_stats_of(self.bns, mean.split(widths), var.split(widths))
        return out

    def _forward_synced(self, x: Tensor) -> Tensor:
        """Training with batch statistics over every process (``sync_bn``), in torch
        ops around differentiable all-reduces."""
        if x.dim() == 4:
            x = x.mean((2, 3))
        logits = []
        for i, fc in enumerate(self.fcs):
            p = x[:, : fc.in_features]
            if i < len(self.bns):
                p = torch.relu(synced_batch_norm(p, self.bns[i], self.process_group))
            logits.append(fc(p))
        stacked = torch.stack(logits)
        return stacked if self.outputs == "all" else stacked.mean(0)

    __prepare_scriptable__ = refuse_scripting

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"num_heads={self.num_heads}, norm_last_head={self.norm_last_head}, outputs={self.outputs!r}"
        )
