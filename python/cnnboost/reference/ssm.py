"""Reference SSM: G separate BatchNorm1d + ReLU + Linear heads on the nested prefixes
of the feature, as the paper draws it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SSM(nn.Module):
    """Same constructor, submodule names and results as :class:`cnnboost.SSM`."""

    def __init__(self, in_features, num_classes, num_heads=4, norm_last_head=False, outputs="ensemble",
                 eps=1e-5, momentum=0.1, device=None, dtype=None):
        super().__init__()
        self.outputs = outputs
        split = in_features // num_heads
        normalised = num_heads if norm_last_head else num_heads - 1
        self.bns = nn.ModuleList(
            nn.BatchNorm1d((i + 1) * split, eps=eps, momentum=momentum, device=device, dtype=dtype)
            for i in range(normalised)
        )
        self.fcs = nn.ModuleList(
            nn.Linear((i + 1) * split, num_classes, device=device, dtype=dtype) for i in range(num_heads)
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.mean((2, 3))
        outs = []
        for i, fc in enumerate(self.fcs):
            a = x[:, :fc.in_features]
            if i < len(self.bns):
                a = F.relu(self.bns[i](a))
            outs.append(fc(a))
        outs = torch.stack(outs)
        return outs if self.outputs == "all" else outs.mean(0)
