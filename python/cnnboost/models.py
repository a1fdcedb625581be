"""Model surgery: put cnnboost modules into existing torchvision/timm models.

    model = torchvision.models.resnet50(num_classes=100)
    cnnboost.models.attach_head(model, "ffc")      # the final Linear becomes an FFC
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from torch import nn

__all__ = ["attach_head", "find_classifier", "insert_ab", "HEADS"]


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
