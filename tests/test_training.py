"""A small CNN built from every cnnboost module trains for several SGD steps with
the same losses, parameters and running statistics as its pure-torch twin."""

import pytest
import torch
from torch import nn

import cnnboost
from cnnboost import reference


class Net(nn.Module):
    def __init__(self, ns, head: str):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), ns.AB(8))
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), ns.AB(8, groups=1))
        self.fuse = ns.AFI(8, reduction=2, bias=True)
        self.head = ns.SSM(8, 5, num_heads=2) if head == "ssm" else ns.FFC(8, 5, eval_ensemble="mean")

    def forward(self, x):
        x0 = self.stem(x)
        x1 = torch.relu(self.b1(x0))
        x2 = torch.relu(self.b2(x1))
        return self.head(self.fuse([x0, x1, x2]))


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("head", ["ssm", "ffc"])
def test_sgd_steps_match_the_reference_twin(head):
    torch.manual_seed(0)
    fast = Net(cnnboost, head).double()
    ref = Net(reference, head).double()
    ref.load_state_dict(fast.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (fast, ref)]
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (6,), generator=g)
        losses = []
        for model, opt in zip((fast, ref), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-10), f"step {step}"
    for (k, a), (_, b) in zip(fast.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=k)
    fast.eval(), ref.eval()
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fast(x), ref(x))


@pytest.mark.parametrize("head", ["ssm", "ffc"])
def test_a_model_of_every_module_compiles_whole(head):
    """torch.compile(fullgraph=True): no graph break anywhere, and the eager numbers."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Net(cnnboost, head)
    twin = Net(cnnboost, head)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(2)
    for step in range(2):
        x = torch.randn(6, 3, 5, 5, generator=g, requires_grad=True)
        y = torch.randint(0, 5, (6,), generator=g)
        le = nn.functional.cross_entropy(eager(x), y)
        lc = nn.functional.cross_entropy(compiled(x), y)
        torch.testing.assert_close(lc, le, msg=f"loss at step {step}")
        le.backward()
        lc.backward()
    for (k, a), (_, b) in zip(eager.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=k)
    for (k, a), (_, b) in zip(eager.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b, a, msg=k)
    eager.eval(), twin.eval()
    x = torch.randn(4, 3, 5, 5, generator=g)
    torch.testing.assert_close(compiled(x), eager(x))


MODULES = {
    "ffc": (lambda: cnnboost.FFC(8, 3, eval_ensemble="mean"), lambda: torch.randn(4, 8, 2, 2), lambda m, x: m(x)),
    "ssm": (lambda: cnnboost.SSM(8, 3, num_heads=2), lambda: torch.randn(4, 8), lambda m, x: m(x)),
    "ab": (lambda: cnnboost.AB(8, groups=2, bias=True), lambda: torch.randn(4, 8, 3, 3), lambda m, x: m(x)),
    "afi": (lambda: cnnboost.AFI(8, bias=True), lambda: torch.randn(2, 4, 8, 3, 3), lambda m, x: m(list(x))),
}


@pytest.mark.parametrize("name", MODULES)
def test_deepcopy_pickle_state_dict_and_repr(name):
    import copy
    import io

    make, data, call = MODULES[name]
    m = make()
    m.eval()
    x = data()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(m), torch.load(buf, weights_only=False)):
        assert repr(clone) == repr(m)
        torch.testing.assert_close(call(clone, x), call(m, x))
    fresh = make().eval()
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(call(fresh, x), call(m, x))


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_autocast_computes_half_inputs_in_the_parameters_dtype(name, half):
    make, data, call = MODULES[name]
    m = make()
    x = data().to(half)
    with torch.autocast("cpu", dtype=half):
        y = call(m, x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, call(m, x.float()))
    with pytest.raises(TypeError, match="float16|bfloat16"):
        call(m, x)  # outside autocast: a clear error
