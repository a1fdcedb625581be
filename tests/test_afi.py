"""AFI against the pure-torch reference: forward, the gradient of every input map
and of the scorer, over input counts, reductions, biases, dtypes and layouts."""

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
    c = rng.choice([1, 3, 8, 16, 24])
    return dict(m=rng.randint(1, 4), n=rng.randint(1, 5), c=c, h=rng.randint(1, 6), w=rng.randint(1, 6),
                reduction=rng.choice([r for r in (1, 2, 4, 16) if r <= c]), bias=rng.random() < 0.5)


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def maps(case, dtype, layout="contiguous"):
    shape = (case["n"], case["c"], case["h"], case["w"])
    return lambda: [torch.randn(shape, dtype=dtype).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
                    for _ in range(case["m"])]


def call(m, xs):
    return m(xs)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("seed", range(10))
def test_matches_reference(dtype, train, seed, layout):
    case = random_case(seed)
    fast, ref = twins(cnnboost.AFI, reference.AFI, case["c"], reduction=case["reduction"], bias=case["bias"],
                      dtype=dtype, seed=seed)
    made = []

    def make():
        made.append(maps(case, dtype, layout)())
        return made[-1]

    out, ref_out = compare(fast, ref, make, train=train, call=call)
    x = made[0][0]
    if layout == "channels_last" and not x.is_contiguous():
        # the reference's layout, for the output and every input gradient
        assert out.is_contiguous(memory_format=torch.channels_last), out.stride()
        assert ref_out.is_contiguous(memory_format=torch.channels_last), ref_out.stride()
        assert all(x.grad is None or x.grad.is_contiguous(memory_format=torch.channels_last) for x in made[0])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(64, 64, 32, 32), (4, 64, 128, 128)])  # per sample; two passes
def test_maps_past_the_streaming_size_match_reference(train, shape):
    """Outputs of 16 MiB and more are written with streaming stores (kernels/stream.rs)."""
    fast, ref = twins(cnnboost.AFI, reference.AFI, 64, seed=1)
    compare(fast, ref, lambda: [torch.randn(shape, requires_grad=True) for _ in range(3)], train=train, call=call)


def test_one_input_is_returned_unchanged():
    m = randomize_(cnnboost.AFI(8), 1)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    y = m([x])
    assert torch.equal(y, x)
    y.square().sum().backward()
    assert torch.equal(x.grad, 2 * x.detach())
    assert torch.count_nonzero(m.fc1.weight.grad) == 0

@pytest.mark.usefixtures("each_backend")

def test_the_same_module_takes_a_different_number_of_inputs_each_call():
    fast, ref = twins(cnnboost.AFI, reference.AFI, 8, dtype=torch.float64)
    for m in (2, 1, 4, 3):
        compare(fast, ref, lambda: [torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
                                    for _ in range(m)], train=True, call=call)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_gradcheck(bias, m, layout):
    mod = randomize_(cnnboost.AFI(6, reduction=2, bias=bias, dtype=torch.float64), 2)
    names = [k for k, _ in mod.named_parameters()]
    xs = [torch.randn(2, 6, 2, 3, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
          for _ in range(m)]

    def f(*args):
        ins, ps = list(args[:m]), args[m:]
        return torch.func.functional_call(mod, dict(zip(names, ps)), (ins,))

    assert torch.autograd.gradcheck(f, (*xs, *[p for _, p in mod.named_parameters()]))

@pytest.mark.usefixtures("each_backend")

def test_inputs_in_mixed_layouts():
    fast, ref = twins(cnnboost.AFI, reference.AFI, 8, dtype=torch.float64)

    def make():
        a = torch.randn(3, 8, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
        b = torch.randn(3, 16, 4, 5, dtype=torch.float64)[:, ::2].requires_grad_()
        c = torch.randn(3, 8, 4, 5, dtype=torch.float64, requires_grad=True)
        return [a, b, c]

    compare(fast, ref, make, train=True, call=call)

@pytest.mark.usefixtures("each_backend")

def test_the_same_tensor_twice():
    fast, ref = twins(cnnboost.AFI, reference.AFI, 4, dtype=torch.float64)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast([x, x]), ref([x, x]))


def test_state_dict_names_and_shapes():
    m = cnnboost.AFI(16, reduction=4, bias=True)
    assert list(m.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert m.fc1.weight.shape == (4, 16) and m.fc2.weight.shape == (16, 4)
    reference.AFI(16, reduction=4, bias=True).load_state_dict(m.state_dict())
    assert list(cnnboost.AFI(16, reduction=16).state_dict()) == ["fc1.weight", "fc2.weight"]

@pytest.mark.usefixtures("each_backend")

def test_numpy_only_core():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, 8, 3, 3)) for _ in range(3)]
    w1, w2 = rng.standard_normal((2, 8)), rng.standard_normal((8, 2))
    core = _core.AFI(8, 4)
    out, z, hidden, weights = core.forward(xs, w1, None, w2, None)
    np.testing.assert_allclose(weights.sum(0), 1.0, rtol=1e-12)
    ref = reference.AFI(8, dtype=torch.float64)
    with torch.no_grad():
        ref.fc1.weight.copy_(torch.from_numpy(w1))
        ref.fc2.weight.copy_(torch.from_numpy(w2))
    ts = [torch.from_numpy(x).requires_grad_() for x in xs]
    y = ref(ts)
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=1e-10, atol=1e-12)
    g = rng.standard_normal(out.shape)
    gxs, gw1, gb1, gw2, gb2 = core.backward(g, xs, z, hidden, weights, w1, None, w2, None)
    (y * torch.from_numpy(g)).sum().backward()
    assert len(gxs) == 3 and gb1.shape == (0,)
    for a, t in zip(gxs, ts):
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gw1, ref.fc1.weight.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, arg",
    [(dict(channels=0), "channels"), (dict(reduction=0), "reduction"), (dict(reduction=9), "reduction"),
     (dict(reduction=2.0), "reduction")],
)
def test_bad_constructor_arguments(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        cnnboost.AFI(**(dict(channels=8) | kwargs))


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: torch.randn(2, 8, 3, 3), TypeError, ["xs", "list", "Tensor"]),
        (lambda: [], ValueError, ["xs", "at least one"]),
        (lambda: [torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 4)], ValueError, ["xs[1]", "(2, 8, 3, 3)", "(2, 8, 3, 4)"]),
        (lambda: [torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3, dtype=torch.float64)], TypeError, ["xs[1]", "float64"]),
        (lambda: [torch.randn(2, 7, 3, 3)], ValueError, ["xs[0]", "8 channels"]),
        (lambda: [torch.randn(2, 8)], ValueError, ["xs[0]", "4-d"]),
        (lambda: [torch.randn(2, 8, 0, 3)], ValueError, ["xs[0]", "H×W"]),
        (lambda: [torch.randn(2, 8, 3, 3), "x"], TypeError, ["xs[1]", "str"]),
    ],
)
def test_bad_input_raises_and_changes_nothing(make, exc, words):
    m = cnnboost.AFI(8)
    assert_fails_cleanly(m, lambda: m(make()), exc, words)


def test_core_bad_arguments_name_them():
    core = _core.AFI(8, 4)
    xs = [np.zeros((2, 8, 3, 3), np.float32)] * 2
    w1, w2 = np.zeros((2, 8), np.float32), np.zeros((8, 2), np.float32)
    with pytest.raises(ValueError, match="fc1_weight"):
        core.forward(xs, np.zeros((3, 8), np.float32), None, w2, None)
    with pytest.raises(ValueError, match="fc2_bias"):
        core.forward(xs, w1, None, w2, np.zeros(7, np.float32))
    with pytest.raises(TypeError, match=r"xs\[1\]"):
        core.forward([xs[0], xs[1].astype(np.float64)], w1, None, w2, None)
    with pytest.raises(ValueError, match="xs"):
        core.forward([], w1, None, w2, None)
    out, z, h, wts = core.forward(xs, w1, None, w2, None)
    with pytest.raises(ValueError, match="weights"):
        core.backward(out, xs, z, h, wts[:1], w1, None, w2, None)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_compile_fullgraph_matches_eager(layout):
    torch._dynamo.reset()
    m = randomize_(cnnboost.AFI(8, bias=True), 4)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    xs = [torch.randn(2, 8, 3, 3).contiguous(memory_format=LAYOUTS[layout]).requires_grad_() for _ in range(3)]
    y, yc = m(xs), compiled(xs)
    assert_close(yc, y, torch.float32, "compiled output")
    assert yc.stride() == y.stride() == torch.empty_like(xs[0]).stride()
    yc.square().sum().backward()
    g = [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    y.square().sum().backward()
    for a, x in zip(g, xs):
        assert_close(a, x.grad, torch.float32, "compiled grad")
    assert compiled(xs[:2]).shape == (2, 8, 3, 3)  # another M on the next call
