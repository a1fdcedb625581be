"""Model surgery on real torchvision models."""

import pytest
import torch
from torch import nn

import cnnboost
from cnnboost import models

torchvision = pytest.importorskip("torchvision")


def test_attach_ffc_to_resnet18_trains_and_keeps_the_fc_weights():
    model = torchvision.models.resnet18(num_classes=7)
    old = model.fc.weight.detach().clone()
    models.attach_head(model, "ffc")
    assert isinstance(model.fc, cnnboost.FFC)
    assert (model.fc.in_features, model.fc.num_classes) == (512, 7)
    assert torch.equal(model.fc.fc.weight, old)
    x = torch.randn(2, 3, 32, 32)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert model.fc.filter1.weight.grad is not None
    model.eval()
    assert model(x).shape == (2, 7)


def test_attach_finds_classifier_inside_a_sequential():
    model = torchvision.models.mobilenet_v3_small(num_classes=5)
    models.attach_head(model, "ffc", num_filters=2, combine="plain")
    assert isinstance(model.classifier[-1], cnnboost.FFC)
    assert model.classifier[-1].num_filters == 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_attach_ssm_head():
    model = torchvision.models.resnet18(num_classes=6)
    models.attach_head(model, "ssm", num_heads=4)
    assert isinstance(model.fc, cnnboost.SSM)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    model.eval()
    assert model(x).shape == (2, 6)


def test_attach_rejects_unknown_heads_and_models_without_linear():
    with pytest.raises(ValueError, match="head"):
        models.attach_head(torchvision.models.resnet18(), "mlp")
    with pytest.raises(ValueError, match="model"):
        models.attach_head(nn.Conv2d(3, 3, 1), "ffc")


@pytest.mark.parametrize("arch, attr, blocks", [("resnet18", "bn2", 8), ("resnet50", "bn3", 16)])
def test_insert_ab_into_every_residual_block(arch, attr, blocks):
    model = getattr(torchvision.models, arch)(num_classes=4)
    models.insert_ab(model)
    abs_ = [m for m in model.modules() if isinstance(m, cnnboost.AB)]
    assert len(abs_) == blocks
    assert isinstance(getattr(model.layer1[0], attr)[1], cnnboost.AB)
    models.insert_ab(model)  # idempotent
    assert len([m for m in model.modules() if isinstance(m, cnnboost.AB)]) == blocks
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert abs_[0].conv.weight.grad is not None
    model.eval()
    assert model(x).shape == (2, 4)


def test_insert_ab_plus_and_bad_model():
    model = models.insert_ab(torchvision.models.resnet18(), groups=1)
    assert all(m.groups == 1 for m in model.modules() if isinstance(m, cnnboost.AB))
    with pytest.raises(ValueError, match="model"):
        models.insert_ab(nn.Sequential(nn.Linear(2, 2)))
