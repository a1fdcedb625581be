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


def _afis(model):
    return [m for m in model.modules() if isinstance(m, cnnboost.AFI)]


def test_afi_resnet20_has_an_afi_in_blocks_2_and_3_of_each_stage():
    model = models.afi_resnet(20)
    stages = [model.layer1, model.layer2, model.layer3]
    assert [len(s.blocks) for s in stages] == [3, 3, 3]
    for stage, width in zip(stages, (16, 32, 64)):
        first, *rest = stage.blocks
        assert first.afi is None and first.conv1.out_channels == width
        for block in rest:
            assert (block.afi.channels, block.afi.reduction) == (width // 2, 4)
            assert block.conv1.out_channels == width // 2
            assert (block.conv2.in_channels, block.conv2.out_channels) == (width, width)
    assert len(_afis(model)) == 6
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    params = sum(p.numel() for p in model.parameters())
    assert 1e5 < params < 3e5  # a ResNet-20 has 0.27M
    # The paper's Table 4: AFI-ResNet-32 on CIFAR-100 has 378.23K parameters.
    assert sum(p.numel() for p in models.afi_resnet(32, num_classes=100).parameters()) == 378_228


def test_afi_resnet_block_i_fuses_the_i_minus_1_earlier_first_conv_outputs():
    model = models.afi_resnet(26)  # 4 blocks per stage
    seen = {}

    def hook(module, args):
        seen[module] = [tuple(x.shape) for x in args[0]]

    for afi in _afis(model):
        afi.register_forward_pre_hook(hook)
    model(torch.randn(2, 3, 32, 32))
    for stage, (width, side) in zip([model.layer1, model.layer2, model.layer3], [(16, 32), (32, 16), (64, 8)]):
        for i, block in enumerate(stage.blocks[1:], 2):
            assert seen[block.afi] == [(2, width // 2, side, side)] * (i - 1)


def test_afi_resnet_forward_backward_and_eval():
    model = models.afi_resnet(20, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    nn.functional.cross_entropy(out, torch.tensor([1, 5])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    stages = [model.layer1, model.layer2, model.layer3]
    # Block 2 fuses one map: softmax over one is 1, R = X_1, its scorer gets no gradient.
    assert all(s.blocks[1].afi.fc1.weight.grad.abs().sum() == 0 for s in stages)
    # Blocks 3… fuse two or more: their scorers learn (one may start with every
    # hidden unit ReLU'd off, as the fused features are >= 0; not all of them).
    assert any(s.blocks[2].afi.fc1.weight.grad.abs().sum() > 0 for s in stages)
    assert model.layer1.blocks[0].conv1.weight.grad.abs().sum() > 0  # X_1 feeds the later blocks
    model.eval()
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 7) and torch.isfinite(y).all()
        assert torch.equal(model(x), y)
        torch.testing.assert_close(model(x[1:]), y[1:])  # running statistics: no batch coupling


def test_afi_resnet_rejects_bad_arguments():
    for depth in (7, 21, 0, -4):
        with pytest.raises(ValueError, match="depth"):
            models.afi_resnet(depth)
    for depth in (20.0, "20", True):
        with pytest.raises(TypeError, match="depth"):
            models.afi_resnet(depth)
    with pytest.raises(ValueError, match="num_classes"):
        models.afi_resnet(20, num_classes=0)
    for reduction in (0, 9):
        with pytest.raises(ValueError, match="reduction"):
            models.afi_resnet(20, reduction=reduction)
    assert len(_afis(models.afi_resnet(8))) == 0  # n = 1: nothing to fuse
    assert _afis(models.afi_resnet(14, reduction=8))[0].fc1.out_features == 1


def test_afi_resnet_sgd_steps_reduce_the_loss_on_a_fixed_batch():
    model = models.afi_resnet(20, num_classes=4)
    x = torch.randn(8, 3, 16, 16)
    target = torch.arange(8) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses  # 15 seeds tried: at most 0.006x
