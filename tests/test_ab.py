"""AB against the pure-torch reference: forward, every gradient, running statistics,
in train and eval, float32 and float64, AB / AB-Plus / any group count."""

import random

import numpy as np
import pytest
import torch

import cnnboost
from cnnboost import _core, reference
from harness import assert_close, assert_fails_cleanly, compare, randomize_, twins

DTYPES = [torch.float32, torch.float64]


def random_case(seed):
    rng = random.Random(seed)
    c = rng.choice([1, 2, 4, 6, 12, 16, 30])
    divisors = [d for d in range(1, c + 1) if c % d == 0]
    return dict(n=rng.randint(2, 7), c=c, h=rng.randint(1, 6), w=rng.randint(1, 6),
                groups=rng.choice(divisors + [None]), bias=rng.random() < 0.5)


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def inputs(case, dtype, layout="contiguous"):
    def make():
        x = torch.randn(case["n"], case["c"], case["h"], case["w"], dtype=dtype)
        return [x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()]
    return make


def assert_same_layout(out, x, ref_out):
    """A channels_last input gives a channels_last output and input gradient, as the
    reference's (maps with one channel or one pixel are both layouts at once)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), out.stride()
        assert ref_out.is_contiguous(memory_format=torch.channels_last), ref_out.stride()
        if x.grad is not None:
            assert x.grad.is_contiguous(memory_format=torch.channels_last), x.grad.stride()
    else:
        assert out.is_contiguous()


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("seed", range(10))
def test_matches_reference(dtype, train, seed, layout):
    case = random_case(seed)
    fast, ref = twins(cnnboost.AB, reference.AB, case["c"], groups=case["groups"], bias=case["bias"],
                      dtype=dtype, seed=seed)
    made = []

    def make():
        made.extend(inputs(case, dtype, layout)())
        return made[-1:]

    out, ref_out = compare(fast, ref, make, train=train, zero_grads=("conv.bias",) if train else ())
    assert_same_layout(out, made[0], ref_out)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("groups", [None, 4])
def test_maps_past_the_streaming_size_match_reference(train, groups):
    """Outputs of 16 MiB and more are written with streaming stores (kernels/stream.rs)."""
    fast, ref = twins(cnnboost.AB, reference.AB, 256, groups=groups, seed=1)
    compare(fast, ref, lambda: [torch.randn(4, 256, 72, 72, requires_grad=True)], train=train)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_statistics_follow_torch_over_several_steps(momentum):
    fast, ref = twins(cnnboost.AB, reference.AB, 6, groups=3, momentum=momentum, dtype=torch.float64)
    for step in range(4):
        compare(fast, ref, lambda: [torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)], train=True)
    assert fast.bn.num_batches_tracked.item() == 4
    compare(fast, ref, lambda: [torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)], train=False)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [None, 1, 2])
@pytest.mark.parametrize("train", [True, False])
def test_gradcheck(groups, train, layout):
    m = randomize_(cnnboost.AB(4, groups=groups, bias=True, dtype=torch.float64), 3).train(train)
    names = [k for k, _ in m.named_parameters()]
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()

    def f(x, *ps):
        state = dict(zip(names, ps))
        state.update({k: v.clone() for k, v in m.named_buffers()})  # keep running stats out of the check
        return torch.func.functional_call(m, state, (x,))

    assert torch.autograd.gradcheck(f, (x, *[p for _, p in m.named_parameters()]))


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded"])
def test_non_contiguous_inputs(layout):
    fast, ref = twins(cnnboost.AB, reference.AB, 8, groups=2, dtype=torch.float64)

    def make():
        if layout == "channels_last":
            x = torch.randn(4, 8, 5, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
        elif layout == "sliced":
            x = torch.randn(4, 16, 5, 3, dtype=torch.float64)[:, ::2]
        else:
            x = torch.randn(4, 8, 1, 3, dtype=torch.float64).expand(4, 8, 5, 3)
        return [x.requires_grad_() if x.is_leaf else x]

    compare(fast, ref, make, train=True)


def test_state_dict_names_and_shapes():
    m = cnnboost.AB(6, groups=2, bias=True)
    assert list(m.state_dict()) == [
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked",
    ]
    assert m.conv.weight.shape == (6, 3, 1, 1)
    reference.AB(6, groups=2, bias=True).load_state_dict(m.state_dict())
    assert "conv.bias" not in cnnboost.AB(6).state_dict()

@pytest.mark.usefixtures("each_backend")

def test_numpy_only_core():
    rng = np.random.default_rng(0)
    n, c, g = 4, 6, 3
    x = rng.standard_normal((n, c, 3, 3))
    w, gamma, beta = rng.standard_normal((c, c // g, 1, 1)), 1 + 0.2 * rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = np.zeros(c), np.ones(c)
    core = _core.AB(c, g)
    out, pooled, mean, invstd, var = core.forward(x, w, None, gamma, beta, rm, rv, True)
    ref = reference.AB(c, groups=g, dtype=torch.float64)
    with torch.no_grad():
        ref.conv.weight.copy_(torch.from_numpy(w))
        ref.bn.weight.copy_(torch.from_numpy(gamma))
        ref.bn.bias.copy_(torch.from_numpy(beta))
    xt = torch.from_numpy(x).requires_grad_()
    yt = ref(xt)
    np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var, ref.bn.running_var.numpy() * 10 - 9, rtol=1e-9)  # momentum 0.1 from 1
    g_out = rng.standard_normal(x.shape)
    gx, gw, gb, ggamma, gbeta = core.backward(g_out, x, pooled, mean, invstd, w, None, gamma, beta, True)
    (yt * torch.from_numpy(g_out)).sum().backward()
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gw, ref.conv.weight.grad.numpy(), rtol=1e-9, atol=1e-12)
    assert gb.shape == (0,)
    np.testing.assert_allclose(ggamma, ref.bn.weight.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(channels=0), "channels"),
        (dict(groups=4), "groups"),
        (dict(groups=0), "groups"),
        (dict(eps=0.0), "eps"),
        (dict(momentum=2.0), "momentum"),
    ],
)
def test_bad_constructor_arguments(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        cnnboost.AB(**(dict(channels=6) | kwargs))


@pytest.mark.parametrize(
    "make, exc, words, train",
    [
        (lambda: torch.randn(4, 6), ValueError, ["x", "4-d", "(4, 6)"], True),
        (lambda: torch.randn(4, 5, 3, 3), ValueError, ["x", "6 channels", "(4, 5, 3, 3)"], True),
        (lambda: torch.randn(1, 6, 3, 3), ValueError, ["x", "more than 1", "(1, 6, 3, 3)"], True),
        (lambda: torch.randn(4, 6, 0, 3), ValueError, ["x", "H×W"], False),
        (lambda: torch.randn(4, 6, 3, 3, dtype=torch.float64), TypeError, ["x", "float32", "float64"], True),
        (lambda: torch.randn(4, 6, 3, 3).half(), TypeError, ["x", "float16"], False),
    ],
)
def test_bad_input_raises_and_changes_nothing(make, exc, words, train):
    m = cnnboost.AB(6, groups=2).train(train)
    assert_fails_cleanly(m, lambda: m(make()), exc, words)


def test_a_batch_of_one_is_fine_in_eval():
    fast, ref = twins(cnnboost.AB, reference.AB, 6)
    compare(fast, ref, lambda: [torch.randn(1, 6, 2, 2, requires_grad=True)], train=False)


def test_core_bad_arguments_name_them():
    core = _core.AB(6, 2)
    f = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    args = [f(2, 6, 3, 3), f(6, 3, 1, 1), None, f(6), f(6), f(6), f(6), True]
    for i, (arg, bad) in enumerate([("conv_weight", f(6, 2, 1, 1)), ("bn_weight", f(5)), ("running_var", f(7))]):
        call = list(args)
        call[{"conv_weight": 1, "bn_weight": 3, "running_var": 6}[arg]] = bad
        with pytest.raises(ValueError, match=arg):
            core.forward(*call)
    with pytest.raises(ValueError, match="groups"):
        _core.AB(6, 4)
    with pytest.raises(TypeError, match="conv_bias"):
        call = list(args)
        call[2] = np.zeros(6, np.float64)
        core.forward(*call)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_compile_fullgraph_matches_eager(layout):
    torch._dynamo.reset()
    fast, twin = twins(cnnboost.AB, cnnboost.AB, 8, groups=4, seed=2)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8, 3, 3).contiguous(memory_format=LAYOUTS[layout])
    y, yc = fast(x), compiled(x)
    assert_close(yc, y, torch.float32, "compiled output")
    assert_close(twin.bn.running_var, fast.bn.running_var, torch.float32, "running_var")
    assert twin.bn.num_batches_tracked.item() == 1
    xg = x.clone().requires_grad_()
    compiled(xg).square().sum().backward()
    xf = x.clone().requires_grad_()
    fast(xf).square().sum().backward()
    assert_close(xg.grad, xf.grad, torch.float32, "compiled grad")
    assert xg.grad.stride() == xf.grad.stride()
    fast.eval(), twin.eval()
    yc, y = compiled(x), fast(x)
    assert_close(yc, y, torch.float32, "compiled eval")
    assert yc.stride() == y.stride() == torch.empty_like(x).stride()
