"""Distributed training helpers."""

from __future__ import annotations

from torch import nn

__all__ = ["convert_sync_batchnorm"]


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Makes every cnnboost module with batch statistics (AB, SSM) in ``module``
    reduce them across the processes of ``process_group`` (default: all) in
    training — the counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``,
    which cannot be used here: it swaps BatchNorm submodules for a class that runs
    on GPUs only, and cnnboost's kernels do not use their BatchNorm submodules'
    forward. In place; returns ``module``. Without torch.distributed, or with one
    process, the modules run as before."""
    from .ab import AB
    from .ssm import SSM

    for m in module.modules():
        if isinstance(m, (AB, SSM)):
            m.sync_bn = True
            m.process_group = process_group
    return module
