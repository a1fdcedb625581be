"""One harness for every module's tests: build a fast module and its reference twin
with the same (randomised) state, run both on the same inputs, and compare outputs,
input gradients, parameter gradients and buffers."""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import pytest
import torch
from torch import nn

TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Moves every floating parameter and buffer off its default (LayerNorm/BN weights
    of 1 and biases of 0 hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5
                    + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64).to(b.dtype) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype) * 0.3)
    return module


def twins(fast_cls, ref_cls, *args, dtype=torch.float32, seed=0, **kwargs):
    """(fast, reference) with identical randomised state."""
    fast = randomize_(fast_cls(*args, **kwargs).to(dtype), seed)
    ref = ref_cls(*args, **kwargs).to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def assert_close(actual, expected, dtype, what, scale=1.0):
    """`scale` multiplies the absolute tolerance: gradients are compared at the
    scale of the module's largest gradient, since one that is zero in exact
    arithmetic (a bias followed by batch norm) is float round-off on both sides."""
    tol = dict(TOL[dtype])
    tol["atol"] *= max(1.0, scale)
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def _leaves(inputs):
    """The tensors among the inputs, those in a list input (AFI's maps) included."""
    flat = [t for v in inputs for t in (v if isinstance(v, (list, tuple)) else [v])]
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _copy_inputs(inputs, convert=lambda t: t):
    """Fresh leaves with the inputs' values (``convert``-ed), lists of tensors included,
    so that each module's gradients land on tensors of its own."""
    def one(t):
        if not isinstance(t, torch.Tensor):
            return t
        return convert(t.detach().clone()).requires_grad_(t.requires_grad)
    return [[one(t) for t in v] if isinstance(v, (list, tuple)) else one(v) for v in inputs]


def assert_close_or_closer(actual, expected, truth, dtype, what, scale=1.0):
    """`assert_close`, or, in float32 where that fails, at most twice as far from the
    reference's float64 result (`truth`) as the reference's own float32 result is,
    plus 1e-4 of the gradients' scale. In ill-conditioned cases (a batch norm over a
    batch of two) torch's float32 is no oracle: measured on such failures, the
    kernels (which sum in float64) were the closer of the two in 12 of 17."""
    try:
        assert_close(actual, expected, dtype, what, scale)
    except AssertionError:
        if truth is None:
            raise
        err = (actual.double() - truth).abs().max().item()
        ref_err = (expected.double() - truth).abs().max().item()
        if not err <= 2 * ref_err + 5 * TOL[dtype]["atol"] * max(1.0, scale):
            raise AssertionError(f"{what}: {err:.3g} from the float64 reference, where torch's float32 is "
                                 f"{ref_err:.3g} from it") from None


def compare(
    fast: nn.Module,
    ref: nn.Module,
    make_inputs: Callable[[], Sequence[torch.Tensor]],
    *,
    train: bool,
    call: Callable = lambda m, inputs: m(*inputs),
    backward: bool = True,
    zero_grads: Sequence[str] = (),
):
    """Runs both modules on equal fresh inputs and compares every result.

    In float32 the reference also runs in float64 from the same state: a value that
    misses the float32 reference passes if it is at most twice as far from the
    float64 one as the float32 reference is (`assert_close_or_closer`).

    `zero_grads` names parameters whose gradient is zero in exact arithmetic (a
    bias followed by a training-mode batch norm): both sides then hold round-off,
    which is checked to be ~0 in float64 instead of compared."""
    dtype = next(fast.parameters()).dtype
    fast.train(train)
    ref.train(train)
    exact = copy.deepcopy(ref).double() if dtype == torch.float32 else None
    inputs_f = make_inputs()
    inputs_r = _copy_inputs(inputs_f)
    inputs_e = _copy_inputs(inputs_r, torch.Tensor.double) if exact is not None else None
    out_f = call(fast, inputs_f)
    out_r = call(ref, inputs_r)
    out_e = call(exact, inputs_e) if exact is not None else None
    assert out_f.shape == out_r.shape
    assert out_f.dtype == out_r.dtype
    assert_close_or_closer(out_f, out_r, out_e, dtype, "output")
    buffers_e = dict(exact.named_buffers()) if exact is not None else {}
    for (name, b_f), (_, b_r) in zip(fast.named_buffers(), ref.named_buffers()):
        if b_f.is_floating_point():
            assert_close_or_closer(b_f, b_r, buffers_e.get(name), dtype, f"buffer {name}")
        else:
            assert torch.equal(b_f, b_r), f"buffer {name}: {b_f} != {b_r}"
    if not backward or not out_f.requires_grad:
        return out_f, out_r
    weight = torch.randn(out_f.shape, dtype=dtype, device=out_f.device)
    (out_f * weight).sum().backward()
    (out_r * weight).sum().backward()
    if exact is not None:
        (out_e * weight.double()).sum().backward()
    ref_grads = [t.grad for t in _leaves(inputs_r) if t.requires_grad] + [p.grad for p in ref.parameters()]
    scale = max((g.abs().max().item() for g in ref_grads if g is not None and g.numel()), default=1.0)
    leaves_e = _leaves(inputs_e) if exact is not None else [None] * len(_leaves(inputs_r))
    for i, (a, b, e) in enumerate(zip(_leaves(inputs_f), _leaves(inputs_r), leaves_e)):
        if b.requires_grad:
            assert_close_or_closer(a.grad, b.grad, None if e is None else e.grad, dtype, f"grad of input {i}", scale)
    params_e = dict(exact.named_parameters()) if exact is not None else {}
    for (name, p_f), (_, p_r) in zip(fast.named_parameters(), ref.named_parameters()):
        if name in zero_grads:
            # In float32 both sides hold round-off of a cancellation amplified by
            # 1/sqrt(var + eps), as large as 1e-3 for a channel whose batch variance
            # is ~0, so only float64 can show the gradient is zero.
            if dtype == torch.float64:
                bound = 1e-9 * max(1.0, scale)
                assert p_f.grad.abs().max() <= bound, f"grad of {name} should be ~0: {p_f.grad}"
            assert torch.isfinite(p_f.grad).all(), f"grad of {name}: {p_f.grad}"
            continue
        e = params_e.get(name)
        assert_close_or_closer(p_f.grad, p_r.grad, None if e is None else e.grad, dtype, f"grad of {name}", scale)
    return out_f, out_r


def state_of(module: nn.Module) -> dict:
    """A deep copy of parameters, buffers and grads, to check a failed call changed nothing."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    state.update({f"{k}.grad": p.grad.clone() for k, p in module.named_parameters() if p.grad is not None})
    return state


def assert_unchanged(module: nn.Module, before: dict):
    after = state_of(module)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed on a failed call"


def assert_raises_naming(call: Callable[[], object], exc, words: Sequence[str]):
    """``call()`` raises ``exc`` with a message that contains every one of ``words``."""
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def assert_fails_cleanly(module: nn.Module, call: Callable[[], object], exc, words: Sequence[str]):
    """``call()`` raises ``exc`` naming every one of ``words``, and leaves the module's
    parameters, buffers and grads as they were."""
    before = state_of(module)
    assert_raises_naming(call, exc, words)
    assert_unchanged(module, before)


def deepcopy_equal(module: nn.Module):
    clone = copy.deepcopy(module)
    for (k, a), (_, b) in zip(module.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), k
    return clone


LAYOUTS_2D_4D = ["transposed", "sliced", "channels_last", "expanded"]


def non_contiguous_features(layout: str, n: int = 7, c: int = 12, dtype=torch.float64) -> torch.Tensor:
    """A non-contiguous `[n, c]` or `[n, c, H, W]` input (a leaf requiring grad when
    it is one) in one of LAYOUTS_2D_4D, for the classifier heads."""
    if layout == "transposed":
        x = torch.randn(c, n, dtype=dtype).t()
    elif layout == "sliced":
        x = torch.randn(n, 2 * c + 6, dtype=dtype)[:, 3:3 + 2 * c:2]
    elif layout == "channels_last":
        x = torch.randn(n, c, 3, 4, dtype=dtype).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(n, c, 1, 1, dtype=dtype).expand(n, c, 3, 3)
    assert not x.is_contiguous()
    return x.requires_grad_() if x.is_leaf else x
