"""Reference AFI: pool, score and softmax with torch ops; the weighted sum in Python."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AFI(nn.Module):
    """Same constructor, parameter names and results as :class:`cnnboost.AFI`."""

    def __init__(self, channels, reduction=4, bias=False, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(channels // reduction, channels, bias=bias, device=device, dtype=dtype)

    def forward(self, xs):
        z = torch.stack([x.mean((2, 3)) for x in xs])  # [M, N, C]
        w = torch.softmax(self.fc2(F.relu(self.fc1(z))), dim=0)
        return sum(w[i][:, :, None, None] * x for i, x in enumerate(xs))
