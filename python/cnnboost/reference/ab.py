"""Reference AB: torch's own pooling, Conv2d, BatchNorm2d and sigmoid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AB(nn.Module):
    """Same constructor, parameter names and results as :class:`cnnboost.AB`."""

    def __init__(self, channels, groups=None, bias=False, eps=1e-5, momentum=0.1, device=None, dtype=None):
        super().__init__()
        g = channels if groups is None else groups
        self.conv = nn.Conv2d(channels, channels, 1, groups=g, bias=bias, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def forward(self, x):
        return x * torch.sigmoid(self.bn(self.conv(F.adaptive_avg_pool2d(x, 1))))
