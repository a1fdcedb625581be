"""Model surgery: put cnnboost modules into existing torchvision/timm models.

    model = torchvision.models.resnet50(num_classes=100)
    cnnboost.models.attach_head(model, "ffc")      # the final Linear becomes an FFC

and whole models built around a module:

    model = cnnboost.models.afi_resnet(32, num_classes=100)   # the AFI paper's AFI-ResNet-32
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._torch import check_int

__all__ = ["attach_head", "find_classifier", "insert_ab", "afi_resnet", "HEADS"]


def _ffc(in_features: int, num_classes: int, **kwargs) -> nn.Module:
    from .ffc import FFC

    return FFC(in_features, num_classes, **kwargs)


def _ssm(in_features: int, num_classes: int, **kwargs) -> nn.Module:
    from .ssm import SSM

    return SSM(in_features, num_classes, **kwargs)


#: The heads ``attach_head`` knows, by name: ``(in_features, num_classes, **kwargs) -> module``.
HEADS: Dict[str, Callable[..., nn.Module]] = {"ffc": _ffc, "ssm": _ssm}


def find_classifier(model: nn.Module) -> Tuple[nn.Module, str, nn.Linear]:
    """``(parent, attribute, linear)`` of a model's final classifier: timm's
    ``get_classifier()`` when the model has it, else the last ``nn.Linear`` in
    registration order (torchvision's ``fc``, ``classifier[-1]``, ``head``, …)."""
    target = None
    if hasattr(model, "get_classifier"):
        cls = model.get_classifier()
        if isinstance(cls, nn.Linear):
            target = cls
    if target is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"model: expected a model with an nn.Linear classifier, found none in {type(model).__name__}")
        target = linears[-1]
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is target:
                return parent, name, target
    raise ValueError("model: its classifier is not reachable through named_children()")


def attach_head(model: nn.Module, head: str = "ffc", **kwargs) -> nn.Module:
    """Replaces the model's final ``nn.Linear`` by a cnnboost head with the same
    feature size and class count, in place; returns the model.

    ``head``: a name in :data:`HEADS` (``"ffc"``, ``"ssm"``); ``kwargs`` go to the
    head's constructor. The new head gets the Linear's device and dtype; for FFC the
    Linear's trained weights are copied into its shared ``fc`` so a fine-tune starts
    from them. (SSM's heads have other shapes and start fresh.)
    """
    if head not in HEADS:
        raise ValueError(f"head: expected one of {', '.join(map(repr, HEADS))}, got {head!r}")
    parent, name, linear = find_classifier(model)
    new = HEADS[head](linear.in_features, linear.out_features,
                      device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
    fc = getattr(new, "fc", None)
    if isinstance(fc, nn.Linear) and linear.bias is not None:
        fc.load_state_dict(linear.state_dict())
    setattr(parent, name, new)
    return model


def insert_ab(model: nn.Module, groups=None, **kwargs) -> nn.Module:
    """Puts an AB block into every residual block of a torchvision ResNet, on the
    residual branch just before the sum (the AB paper's placement): the last
    BatchNorm of each ``BasicBlock`` (``bn2``) or ``Bottleneck`` (``bn3``) becomes
    ``Sequential(bn, AB(C))``. ``groups=1`` inserts AB-Plus. In place; returns the
    model. Blocks that already have one are left alone."""
    from .ab import AB

    count = 0
    for block in model.modules():
        kind = type(block).__name__
        attr = {"BasicBlock": "bn2", "Bottleneck": "bn3"}.get(kind)
        if attr is None:
            continue
        bn = getattr(block, attr)
        if isinstance(bn, nn.Sequential) and any(isinstance(m, AB) for m in bn):
            continue
        ab = AB(bn.num_features, groups=groups, device=bn.weight.device, dtype=bn.weight.dtype, **kwargs)
        setattr(block, attr, nn.Sequential(bn, ab))
        count += 1
    if count == 0 and not any(isinstance(m, AB) for m in model.modules()):
        raise ValueError(f"model: expected a ResNet with BasicBlock/Bottleneck blocks, found none in {type(model).__name__}")
    return model


class AFIBasicBlock(nn.Module):
    """One residual block of an AFI-ResNet stage (the AFI paper's Figure 3b, its
    "AFI-Network" setting).

    ``forward(x, earlier) -> (out, feature)``: ``feature = ReLU(BN(conv1(x)))`` is the
    block's first-convolution output, ``earlier`` the features of the stage's earlier
    blocks. With ``fuse`` (blocks 2… of a stage) ``conv1`` gives half the stage width,
    ``R = AFI(earlier)`` fills the other half, and ``conv2`` (3x3, C -> C) reads
    ``cat([feature, R])``. Without (block 1) the block is a plain BasicBlock and the
    first ``C // 2`` channels of its ``conv1`` output are its feature. Then
    ``out = ReLU(BN(conv2(·)) + shortcut(x))``; the shortcut is a 1x1 conv + BN where
    the stride or width changes, else the identity.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1, fuse: bool = False,
                 reduction: int = 4) -> None:
        super().__init__()
        from .afi import AFI

        self.half = channels // 2
        width = self.half if fuse else channels
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.afi = AFI(self.half, reduction) if fuse else None
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: Tensor, earlier: Sequence[Tensor] = ()) -> Tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.afi is None:
            feature = out[:, : self.half]
        else:
            feature = out
            out = torch.cat([out, self.afi(list(earlier))], dim=1)
        out = F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
        return out, feature


class AFIStage(nn.Module):
    """The blocks of one stage; block i (i >= 2) fuses the features of blocks 1 … i-1."""

    def __init__(self, in_channels: int, channels: int, blocks: int, stride: int, reduction: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            AFIBasicBlock(in_channels if i == 0 else channels, channels, stride if i == 0 else 1,
                          fuse=i > 0, reduction=reduction)
            for i in range(blocks)
        )

    def forward(self, x: Tensor) -> Tensor:
        features: List[Tensor] = []
        for block in self.blocks:
            x, feature = block(x, features)
            features.append(feature)
        return x


class AFIResNet(nn.Module):
    """A CIFAR AFI-ResNet (the AFI paper's Table 3): a 3x3 stem conv to 16 channels,
    three :class:`AFIStage` of 16, 32, 64 channels (strides 1, 2, 2), global average
    pooling and a Linear classifier. Built by :func:`afi_resnet`."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, reduction: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = AFIStage(16, 16, blocks_per_stage, 1, reduction)
        self.layer2 = AFIStage(16, 32, blocks_per_stage, 2, reduction)
        self.layer3 = AFIStage(32, 64, blocks_per_stage, 2, reduction)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def afi_resnet(depth: int, num_classes: int = 10, reduction: int = 4) -> AFIResNet:
    """The AFI paper's AFI-ResNet-``depth`` for 32x32 inputs (CIFAR): ``depth = 6n + 2``
    (20, 32, 56, 110, …), n :class:`AFIBasicBlock` per stage of 16/32/64 channels.

    In block i >= 2 of a stage, an AFI fuses the first-convolution outputs
    X_1 … X_{i-1} of the stage's earlier blocks into R, and R is concatenated with the
    block's own first-convolution output X_i, which is half the stage width: the
    paper's "AFI-Network" setting ("replacing half of the output from first
    convolution operations ... with the output of the AFI module", reduction r = 4 by
    default). So ``conv2`` stays a 3x3 conv C -> C and no projection is needed.

    Where the paper is silent:

    * Block 1 of a stage (nothing to fuse; it also does the stride and width change)
      is a plain BasicBlock; the first C/2 channels of its first-convolution output
      serve as X_1. In block 2 the AFI sees one map, so R = X_1 exactly (the softmax
      over one map is 1) and that AFI's scorer gets no gradient; it is kept so the
      parameter count matches the paper's.
    * As in an SE block, the scorer reads the GAP of features >= 0 (post-ReLU), so
      some of its hidden units (all, now and then, of a 2-unit first-stage scorer)
      start with the ReLU off; R is then the plain mean of the maps until training
      moves the features. Torch's default ``nn.Linear`` init is kept for the scorer.
    * Shortcuts: identity, or 1x1 conv + BN where the stride or width changes (with
      these, ``afi_resnet(32, 100)`` has 378,228 parameters and the plain ResNet-32
      472,756: the paper's Table 4 gives 378.23K and 472.76K; ``afi_resnet(110, 100)``
      has 1,334,820 where the paper says 1.35M).
    * The features that are fused and concatenated are taken after BN and ReLU; convs
      get Kaiming-normal (fan-out) initialisation, everything else torch's default.

    ``depth = 8`` (n = 1) has no AFI; n = 2 only the identity one of block 2.
    ``reduction``: the AFI scorer's hidden size is ``(C/2) // reduction``, so it must
    be at most 8 (the first stage fuses 8-channel maps). Runs where :class:`cnnboost.AFI`
    runs (CPU tensors, float32 or float64).
    """
    depth = check_int("depth", depth, minimum=8)
    if (depth - 2) % 6:
        raise ValueError(f"depth: expected 6n + 2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {depth}")
    check_int("num_classes", num_classes, minimum=1)
    check_int("reduction", reduction, minimum=1)
    if reduction > 8:
        raise ValueError(f"reduction: expected an int in [1, 8] (the first stage fuses 8-channel maps), got {reduction}")
    return AFIResNet((depth - 2) // 6, num_classes, reduction)
