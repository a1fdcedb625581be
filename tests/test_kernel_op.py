"""The two routes of a kernel op (cnnboost._torch.KernelOp): in eager mode a plain
call (through a small autograd.Function when gradients flow), under torch.compile
and for fake tensors the torch.library custom op. Both run the same implementation;
each module's test file compares the compiled route with the eager one, and the eager
one with the reference."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cnnboost
from cnnboost import ab, ssm


class Counting:
    """Wraps a KernelOp's custom op and counts the calls that reach it."""

    def __init__(self, op, monkeypatch):
        self.calls = 0
        custom = op.custom

        def counted(*args):
            self.calls += 1
            return custom(*args)

        monkeypatch.setattr(op, "custom", counted)


def test_eager_training_step_skips_the_custom_op(monkeypatch):
    fwd, bwd = Counting(ssm.ssm_forward, monkeypatch), Counting(ssm.ssm_backward, monkeypatch)
    m = cnnboost.SSM(8, 3, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert type(out.grad_fn).__name__ == "_EagerOpBackward"
    out.sum().backward()
    assert (fwd.calls, bwd.calls) == (0, 0)
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())


def test_without_gradients_the_implementation_is_called_directly(monkeypatch):
    fwd = Counting(ab.ab_forward, monkeypatch)
    m = cnnboost.AB(6).eval()
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    with torch.no_grad():
        y = m(x)
    assert y.grad_fn is None
    m.requires_grad_(False)  # frozen, and an input that needs no gradient
    z = m(x.detach())
    assert z.grad_fn is None and fwd.calls == 0
    assert torch.equal(y, z)


def test_compiled_module_goes_through_the_custom_op(monkeypatch):
    fwd, bwd = Counting(ab.ab_forward, monkeypatch), Counting(ab.ab_backward, monkeypatch)
    torch._dynamo.reset()
    m = cnnboost.AB(6)
    x = torch.randn(3, 6, 4, 4, requires_grad=True)
    torch.compile(m, fullgraph=True, backend="aot_eager")(x).sum().backward()
    assert fwd.calls > 0 and bwd.calls > 0
    torch._dynamo.reset()


def test_fake_tensors_go_through_the_custom_op(monkeypatch):
    fwd = Counting(ssm.ssm_forward, monkeypatch)
    with FakeTensorMode():
        out = cnnboost.SSM(8, 4)(torch.empty(4, 8))
    assert tuple(out.shape) == (4, 4) and fwd.calls == 1


@pytest.mark.parametrize("module", ["ffc", "ssm", "ab", "afi"])
def test_both_routes_give_the_same_step(module):
    """One training step through the eager route and through the custom op (forced),
    bit for bit: outputs, input and parameter gradients, running statistics."""
    from cnnboost import _torch

    def run(force_custom):
        torch.manual_seed(0)
        if module in ("ffc", "ssm"):
            m = getattr(cnnboost, module.upper())(8, 5)
            xs = torch.randn(6, 8, requires_grad=True)
            inputs = [xs]
        elif module == "ab":
            m, xs = cnnboost.AB(8, groups=2), torch.randn(3, 8, 4, 4, requires_grad=True)
            inputs = [xs]
        else:
            m = cnnboost.AFI(8)
            xs = [torch.randn(3, 8, 4, 4, requires_grad=True) for _ in range(2)]
            inputs = xs
        plain = _torch._plain_tensors
        if force_custom:
            _torch._plain_tensors = lambda _: False
        try:
            out = m(xs)
            out.backward(torch.randn_like(out))
        finally:
            _torch._plain_tensors = plain
        return [out.detach()] + [t.grad for t in inputs] + [p.grad for p in m.parameters()] + list(m.buffers())

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
