"""Property-based tests (hypothesis): drawn shapes, dtypes, layouts, hyper-parameters
and modes agree with the reference; drawn invalid calls raise an exception that names
the argument and change nothing."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnboost
from cnnboost import _core, reference
from harness import assert_unchanged, compare, state_of, twins

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dtypes = st.sampled_from([torch.float32, torch.float64])
layouts = st.sampled_from(["contiguous", "transposed", "sliced", "channels_last"])


def laid_out(shape, dtype, layout, seed):
    """A tensor of `shape` in the given memory layout (values from `seed`)."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    if layout == "transposed" and len(shape) == 2:
        return torch.randn(c, n, dtype=dtype, generator=g).t()
    if layout == "sliced":
        big = torch.randn((n, 2 * c + 1) + tuple(shape[2:]), dtype=dtype, generator=g)
        return big[:, 1::2]
    if layout == "channels_last" and len(shape) == 4:
        return torch.randn(shape, dtype=dtype, generator=g).to(memory_format=torch.channels_last)
    return torch.randn(shape, dtype=dtype, generator=g)


def compare_drawn(fast, ref, shape, case, **kwargs):
    """`compare` on one input of `shape` in the case's drawn layout, dtype and mode."""

    def make():
        x = laid_out(shape, case["dtype"], case["layout"], case["seed"])
        return [x.requires_grad_() if x.is_leaf else x]

    compare(fast, ref, make, train=case["train"], **kwargs)


@st.composite
def ffc_cases(draw):
    return dict(
        n=draw(st.integers(1, 12)),
        c=draw(st.integers(1, 48)),
        k=draw(st.integers(1, 16)),
        num_filters=draw(st.integers(1, 5)),
        combine=draw(st.sampled_from(["paper", "plain"])),
        outputs=draw(st.sampled_from(["ensemble", "all"])),
        eval_ensemble=draw(st.sampled_from(["vote", "mean"])),
        spatial=draw(st.sampled_from([(), (1, 1), (2, 3), (4, 4)])),
        train=draw(st.booleans()),
        dtype=draw(dtypes),
        layout=draw(layouts),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(ffc_cases())
def test_ffc_agrees_with_reference(case):
    torch.manual_seed(case["seed"])
    if case["c"] == 1 and case["dtype"] == torch.float32:
        # LayerNorm over one channel: the true input gradient is exactly 0 and both
        # sides return float32 round-off amplified by 1/sqrt(eps); compare in float64.
        case["dtype"] = torch.float64
    fast, ref = twins(cnnboost.FFC, reference.FFC, case["c"], case["k"], case["num_filters"],
                      combine=case["combine"], outputs=case["outputs"], eval_ensemble=case["eval_ensemble"],
                      dtype=case["dtype"], seed=case["seed"])
    compare_drawn(fast, ref, (case["n"], case["c"]) + case["spatial"], case)


@st.composite
def ssm_cases(draw):
    g = draw(st.integers(1, 4))
    return dict(
        n=draw(st.integers(2, 10)), g=g, c=g * draw(st.integers(1, 8)), k=draw(st.integers(1, 12)),
        norm_last_head=draw(st.booleans()), outputs=draw(st.sampled_from(["ensemble", "all"])),
        spatial=draw(st.sampled_from([(), (1, 1), (3, 2)])), train=draw(st.booleans()), dtype=draw(dtypes),
        layout=draw(layouts), seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(ssm_cases())
def test_ssm_agrees_with_reference(case):
    torch.manual_seed(case["seed"])
    fast, ref = twins(cnnboost.SSM, reference.SSM, case["c"], case["k"], case["g"],
                      norm_last_head=case["norm_last_head"], outputs=case["outputs"], dtype=case["dtype"],
                      seed=case["seed"])
    compare_drawn(fast, ref, (case["n"], case["c"]) + case["spatial"], case)


@st.composite
def ab_cases(draw):
    c = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12]))
    return dict(
        n=draw(st.integers(2, 6)), c=c, h=draw(st.integers(1, 5)), w=draw(st.integers(1, 5)),
        groups=draw(st.sampled_from([None] + [d for d in range(1, c + 1) if c % d == 0])),
        bias=draw(st.booleans()), train=draw(st.booleans()), dtype=draw(dtypes),
        layout=draw(layouts), seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(ab_cases())
def test_ab_agrees_with_reference(case):
    torch.manual_seed(case["seed"])
    fast, ref = twins(cnnboost.AB, reference.AB, case["c"], groups=case["groups"], bias=case["bias"],
                      dtype=case["dtype"], seed=case["seed"])
    compare_drawn(fast, ref, (case["n"], case["c"], case["h"], case["w"]), case,
                  zero_grads=("conv.bias",) if case["train"] else ())


@st.composite
def afi_cases(draw):
    c = draw(st.integers(1, 16))
    return dict(
        m=draw(st.integers(1, 4)), n=draw(st.integers(1, 5)), c=c, h=draw(st.integers(1, 5)),
        w=draw(st.integers(1, 5)), reduction=draw(st.integers(1, c)), bias=draw(st.booleans()),
        dtype=draw(dtypes), layouts=draw(st.lists(layouts, min_size=4, max_size=4)),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(afi_cases())
def test_afi_agrees_with_reference(case):
    torch.manual_seed(case["seed"])
    fast, ref = twins(cnnboost.AFI, reference.AFI, case["c"], reduction=case["reduction"], bias=case["bias"],
                      dtype=case["dtype"], seed=case["seed"])
    shape = (case["n"], case["c"], case["h"], case["w"])

    def make():
        xs = [laid_out(shape, case["dtype"], case["layouts"][i], case["seed"] + i) for i in range(case["m"])]
        return [[x.requires_grad_() if x.is_leaf else x for x in xs]]

    out, _ = compare(fast, ref, make, train=True, call=lambda m, ins: m(ins[0]), backward=False)
    xs = make()[0]
    xr = [x.detach().clone().requires_grad_() for x in xs]
    w = torch.randn(out.shape, dtype=case["dtype"])
    (fast(xs) * w).sum().backward()
    (ref(xr) * w).sum().backward()
    for i, (a, b) in enumerate(zip(xs, xr)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4 if case["dtype"] == torch.float32 else 1e-9,
                                   atol=1e-5 if case["dtype"] == torch.float32 else 1e-10, msg=f"xs[{i}]")


BAD_FFC_INPUTS = [
    ("x", lambda: torch.randn(3)),                         # rank 1
    ("x", lambda: torch.randn(2, 8, 3)),                   # rank 3
    ("x", lambda: torch.randn(2, 7)),                      # wrong channel count
    ("x", lambda: torch.randn(2, 8, dtype=torch.float64)),  # dtype of the parameters is float32
    ("x", lambda: torch.randn(2, 8).to(torch.bfloat16)),
    ("x", lambda: torch.zeros(2, 8, dtype=torch.int32)),
    ("x", lambda: torch.randn(2, 8, 0, 3)),                # empty plane
    ("x", lambda: [[0.0] * 8] * 2),                        # not a tensor
]


@SETTINGS
@given(st.sampled_from(BAD_FFC_INPUTS), st.booleans())
def test_ffc_bad_inputs_name_the_argument_and_change_nothing(bad, train):
    arg, make = bad
    m = cnnboost.FFC(8, 3).train(train)
    before = state_of(m)
    with pytest.raises((ValueError, TypeError)) as info:
        m(make())
    assert str(info.value).startswith(arg) or f"{arg}:" in str(info.value)
    assert_unchanged(m, before)


@SETTINGS
@given(
    num_filters=st.one_of(st.integers(-3, 0), st.just(10**30)),
    eps=st.sampled_from([0.0, -1.0, float("nan"), float("inf")]),
)
def test_core_rejects_absurd_hyperparameters(num_filters, eps):
    with pytest.raises((ValueError, OverflowError)):
        _core.FFC(num_filters)
    with pytest.raises(ValueError, match="eps"):
        _core.FFC(2, "paper", eps)


@SETTINGS
@given(st.sampled_from(["misaligned", "readonly", "big-endian", "fortran"]))
def test_core_reads_odd_numpy_buffers_correctly(kind):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 6))
    if kind == "misaligned":
        buf = np.zeros(5 * 6 * 8 + 1, np.uint8)
        odd = np.frombuffer(buf[1:].data, dtype=np.float64).reshape(5, 6)
        odd[...] = x
        assert not odd.flags.aligned
        arg = odd
    elif kind == "readonly":
        arg = x.copy()
        arg.flags.writeable = False
    elif kind == "big-endian":
        arg = x.astype(">f8")
    else:
        arg = np.asfortranarray(x)
    core = _core.FFC(2)
    params = (np.ones((2, 6)), np.zeros((2, 6)), rng.standard_normal((3, 6)), np.zeros(3))
    if kind == "big-endian":
        with pytest.raises(TypeError, match="x"):
            core.forward(arg, *params)
        return
    got, _ = core.forward(arg, *params)
    want, _ = core.forward(np.ascontiguousarray(x), *params)
    np.testing.assert_array_equal(got, want)


def test_dlpack_capsule_consumed_twice_is_an_error_not_a_crash():
    t = torch.randn(3, 4)
    capsule = t.__dlpack__()

    class Once:
        def __dlpack__(self, *args, **kwargs):
            return capsule

        def __dlpack_device__(self):
            return (1, 0)

    core = _core.FFC(1)
    params = (np.ones((1, 4), np.float32), np.zeros((1, 4), np.float32),
              np.ones((2, 4), np.float32), np.zeros(2, np.float32))
    core.forward(Once(), *params)
    with pytest.raises(Exception, match="x"):
        core.forward(Once(), *params)
