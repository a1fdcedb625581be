"""Reference FFC: every output through the Linear separately, as the paper draws it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def vote_scores(outs: Tensor) -> Tensor:
    """The FFC vote of ``[J, N, K]`` logits as a ``[N, K]`` score: ``votes[k]``, plus,
    when several classes tie for the most votes, ``0.5 *`` the highest softmax
    probability among the outputs voting ``k`` for each tied class. Its argmax is the
    class with most votes, ties going to the class backed by the single most
    confident output."""
    j, n, k = outs.shape
    winners = outs.argmax(-1)  # [J, N]
    confidence = F.softmax(outs, dim=-1).amax(-1)  # [J, N]
    votes = F.one_hot(winners, k).sum(0).to(outs.dtype)  # [N, K]
    best = torch.zeros(n, k, dtype=outs.dtype, device=outs.device).scatter_reduce(
        1, winners.t(), confidence.t(), reduce="amax", include_self=True
    )  # out of place: torch.func.vmap cannot write a batched value into an unbatched tensor
    top = votes == votes.amax(1, keepdim=True)
    tied = top & (top.sum(1, keepdim=True) > 1)
    return votes + 0.5 * best * tied


def features(ffc: nn.Module, x: Tensor) -> list[Tensor]:
    """The J features ``ffc``'s Linear classifies: the input and its L filtered
    versions (``combine="plain"``), with the means of neighbours between them
    (``"paper"``)."""
    if x.dim() == 4:
        x = x.mean((2, 3))
    f = [x]
    for l in range(1, ffc.num_filters + 1):
        f.append(F.relu(getattr(ffc, f"filter{l}")(f[-1])))
    if ffc.combine == "plain":
        return f
    g = [f[0]]
    for l in range(1, len(f)):
        g += [(f[l - 1] + f[l]) / 2, f[l]]
    return g


class FFC(nn.Module):
    """Same constructor, parameter names and results as :class:`cnnboost.FFC`."""

    def __init__(self, in_features, num_classes, num_filters=3, combine="paper",
                 eval_ensemble="vote", outputs="ensemble", eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.num_filters, self.combine = num_filters, combine
        self.eval_ensemble, self.outputs = eval_ensemble, outputs
        for l in range(1, num_filters + 1):
            self.add_module(f"filter{l}", nn.LayerNorm(in_features, eps=eps, device=device, dtype=dtype))
        self.fc = nn.Linear(in_features, num_classes, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        outs = torch.stack([self.fc(g) for g in features(self, x)])
        if self.outputs == "all":
            return outs
        if self.training or self.eval_ensemble == "mean":
            return outs.mean(0)
        return vote_scores(outs)
