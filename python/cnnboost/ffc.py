"""FFC — Sequential Feature Filtering Classifier, on the Rust kernels.

The kernels are registered as torch custom ops (``cnnboost::ffc_forward``,
``cnnboost::ffc_backward``, ``cnnboost::ffc_vote``) with fake implementations and
an autograd formula, so autograd, ``torch.compile`` and ``torch.export`` see one op
(in eager mode they are called without the custom op's dispatch: ``_torch.KernelOp``).
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor, nn

from . import _core, reference
from ._torch import (
    autocast_input,
    check_choice,
    check_eps,
    check_int,
    check_tensor,
    core_for,
    from_array,
    grad_is_stored,
    is_channels_last,
    kernel_op,
    map_to_array,
    pooling_grad,
    refuse_scripting,
    to_array,
    uses_torch_ops,
)

__all__ = ["FFC"]

COMBINES = ("paper", "plain")
EVAL_ENSEMBLES = ("vote", "mean")
OUTPUTS = ("ensemble", "all")


@functools.lru_cache(maxsize=64)
def _kernels(core, num_filters: int, combine: str, eps: float) -> _core.FFC:
    return core.FFC(num_filters, combine, eps)


def _num_outputs(num_filters: int, combine: str) -> int:
    return 2 * num_filters + 1 if combine == "paper" else num_filters + 1


@kernel_op("cnnboost::ffc_forward")
def ffc_forward(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    fc_weight: Tensor,
    fc_bias: Tensor,
    combine: str,
    eps: float,
    all_outputs: bool,
    channels_last: bool,
) -> Tuple[Tensor, Tensor]:
    """Returns (logits, pooled): pooled is the [N, C] average of a 4-d x, kept for the
    backward (empty for a 2-d x, which is its own). ``channels_last``: x is a CPU
    ``channels_last`` map, read in that memory order."""
    k = _kernels(core_for(ln_weight), ln_weight.shape[0], combine, eps)
    out, pooled = k.forward(
        map_to_array(x, channels_last),
        to_array(ln_weight),
        to_array(ln_bias),
        to_array(fc_weight),
        to_array(fc_bias),
        "all" if all_outputs else "ensemble",
        channels_last,
    )
    return from_array(out), from_array(pooled)


@ffc_forward.register_fake
def _(x, ln_weight, ln_bias, fc_weight, fc_bias, combine, eps, all_outputs, channels_last):
    n, c, nf, k = x.shape[0], x.shape[1], ln_weight.shape[0], fc_weight.shape[0]
    out_shape = (_num_outputs(nf, combine), n, k) if all_outputs else (n, k)
    return x.new_empty(out_shape), x.new_empty((n, c) if x.dim() == 4 else (0,))


@kernel_op("cnnboost::ffc_backward")
def ffc_backward(
    grad_out: Tensor,
    pooled: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    fc_weight: Tensor,
    fc_bias: Tensor,
    hw: int,
    combine: str,
    eps: float,
    all_outputs: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x per plane [N, C], grad_ln_weight, grad_ln_bias, grad_fc_weight,
    grad_fc_bias); the filter chain is recomputed from the pooled [N, C] input."""
    k = _kernels(core_for(ln_weight), ln_weight.shape[0], combine, eps)
    arrays = k.backward(
        to_array(grad_out),
        to_array(pooled),
        to_array(ln_weight),
        to_array(ln_bias),
        to_array(fc_weight),
        to_array(fc_bias),
        hw,
        "all" if all_outputs else "ensemble",
    )
    return tuple(from_array(a) for a in arrays)  # type: ignore[return-value]


@ffc_backward.register_fake
def _(grad_out, pooled, ln_weight, ln_bias, fc_weight, fc_bias, hw, combine, eps, all_outputs):
    return (
        torch.empty_like(pooled),
        torch.empty_like(ln_weight),
        torch.empty_like(ln_bias),
        torch.empty_like(fc_weight),
        torch.empty_like(fc_bias),
    )


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, fc_weight, fc_bias, combine, eps, all_outputs, channels_last = inputs
    _, pooled = output
    ctx.save_for_backward(x if x.dim() == 2 else pooled, ln_weight, ln_bias, fc_weight, fc_bias)
    ctx.x_shape = x.shape
    ctx.grad_stored = grad_is_stored(x)
    ctx.channels_last = channels_last
    ctx.config = (combine, eps, all_outputs)
    ctx.mark_non_differentiable(pooled)


def _backward(ctx, grad_out, _grad_pooled):
    pooled, ln_weight, ln_bias, fc_weight, fc_bias = ctx.saved_tensors
    combine, eps, all_outputs = ctx.config
    shape = ctx.x_shape
    hw = shape[2] * shape[3] if len(shape) == 4 else 1
    gx, glw, glb, gfw, gfb = ffc_backward(
        grad_out.contiguous(), pooled, ln_weight, ln_bias, fc_weight, fc_bias, hw, combine, eps, all_outputs
    )
    if len(shape) == 4:
        gx = pooling_grad(gx, shape, ctx.grad_stored, ctx.channels_last)
    return gx, glw, glb, gfw, gfb, None, None, None, None


ffc_forward.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("cnnboost::ffc_vote")
def ffc_vote(
    x: Tensor, ln_weight: Tensor, ln_bias: Tensor, fc_weight: Tensor, fc_bias: Tensor, combine: str, eps: float,
    channels_last: bool,
) -> Tensor:
    k = _kernels(core_for(ln_weight), ln_weight.shape[0], combine, eps)
    return from_array(k.vote(
        map_to_array(x, channels_last), to_array(ln_weight), to_array(ln_bias), to_array(fc_weight),
        to_array(fc_bias), channels_last,
    ))


@ffc_vote.register_fake
def _(x, ln_weight, ln_bias, fc_weight, fc_bias, combine, eps, channels_last):
    return x.new_empty((x.shape[0], fc_weight.shape[0]))


class FFC(nn.Module):
    r"""Sequential Feature Filtering Classifier (FFC), a drop-in classifier head.

    ``f0 = GAP(x)``; ``f_l = ReLU(LayerNorm_l(f_{l-1}))`` for ``l = 1..num_filters``;
    each feature of the combined set goes through one shared ``Linear``:

    * ``combine="paper"`` (default): f0, (f0+f1)/2, f1, …, fL — 2L+1 outputs
      (the paper's Out1…Out7 for L = 3);
    * ``combine="plain"``: f0, f1, …, fL — L+1 outputs (the authors' public code).

    What ``forward`` returns:

    * training, or eval with ``eval_ensemble="mean"``: the mean logits ``[N, K]``;
    * eval with ``eval_ensemble="vote"`` (default): a ``[N, K]`` score whose argmax is
      the voted class. Each output votes for its argmax; most votes wins; on a tie, the
      tied class backed by the single most confident output (highest softmax
      probability) wins. The score is ``votes[k]``, plus ``0.5 * max_conf[k]`` for the
      classes tied for the most votes when there is a tie, where ``max_conf[k]`` is
      the highest softmax probability among the outputs that voted ``k``. It is not
      differentiable (``requires_grad`` is False);
    * ``outputs="all"`` (train or eval): the stacked ``[J, N, K]`` logits of every
      output, differentiable, for per-output losses.

    Input: ``[N, C]`` features or an ``[N, C, H, W]`` map (averaged over H×W inside),
    float32 or float64 like the parameters. Under ``torch.autocast`` a float16/bfloat16
    input is computed in the parameters' dtype (as autocast does for normalisation
    layers); outside autocast it raises a TypeError.
    Parameters carry the authors' names: ``filter1..filterL.{weight,bias}`` (LayerNorm
    over C) and ``fc.{weight,bias}`` (Linear C → K), so their checkpoints load as they
    are. A ``filters.{i}.*`` key (0-based, ModuleList style) also loads, into
    ``filter{i+1}``.

    Example::

        model.fc = cnnboost.FFC(model.fc.in_features, model.fc.out_features)
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_filters: int = 3,
        combine: str = "paper",
        eval_ensemble: str = "vote",
        outputs: str = "ensemble",
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.num_filters = check_int("num_filters", num_filters, minimum=1)
        self.combine = check_choice("combine", combine, COMBINES)
        self.eval_ensemble = check_choice("eval_ensemble", eval_ensemble, EVAL_ENSEMBLES)
        self.outputs = check_choice("outputs", outputs, OUTPUTS)
        self.eps = check_eps(eps)
        factory = {"device": device, "dtype": dtype}
        for l in range(1, num_filters + 1):
            self.add_module(f"filter{l}", nn.LayerNorm(in_features, eps=self.eps, **factory))
        self.fc = nn.Linear(in_features, num_classes, **factory)
        self._register_load_state_dict_pre_hook(_accept_modulelist_names)

    @property
    def num_outputs(self) -> int:
        """J: the number of classifier outputs."""
        return _num_outputs(self.num_filters, self.combine)

    def filters(self) -> list[nn.LayerNorm]:
        return [getattr(self, f"filter{l}") for l in range(1, self.num_filters + 1)]

    def forward(self, x: Tensor) -> Tensor:
        x = autocast_input(x, self.fc.weight)
        check_tensor("x", x, ndims=(2, 4), like=self.fc.weight, layout_doc=" [N, C] or [N, C, H, W]")
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"x: expected {self.in_features} channels (in_features) in dim 1, got shape {tuple(x.shape)}"
            )
        if uses_torch_ops(x):
            return reference.FFC.forward(self, x)
        filters = self.filters()
        ln_weight = torch.stack([f.weight for f in filters])
        ln_bias = torch.stack([f.bias for f in filters])
        if self.outputs == "ensemble" and not self.training and self.eval_ensemble == "vote":
            return ffc_vote(
                x.detach(), ln_weight.detach(), ln_bias.detach(), self.fc.weight.detach(),
                self.fc.bias.detach(), self.combine, self.eps, is_channels_last(x),
            )
        out, _ = ffc_forward(
            x, ln_weight, ln_bias, self.fc.weight, self.fc.bias, self.combine, self.eps, self.outputs == "all",
            is_channels_last(x),
        )
        return out

    __prepare_scriptable__ = refuse_scripting

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"num_filters={self.num_filters}, combine={self.combine!r}, "
            f"eval_ensemble={self.eval_ensemble!r}, outputs={self.outputs!r}"
        )


def _accept_modulelist_names(state_dict, prefix, *args, **kwargs):
    """Maps ``filters.{i}.weight`` (0-based) onto ``filter{i+1}.weight``."""
    for key in [k for k in state_dict if k.startswith(prefix + "filters.")]:
        rest = key[len(prefix) + len("filters."):]
        index, _, name = rest.partition(".")
        if index.isdigit():
            state_dict[f"{prefix}filter{int(index) + 1}.{name}"] = state_dict.pop(key)
