"""SSM against the pure-torch reference, through every layer: torch module, custom
ops, `_core` with NumPy, and bad input."""

import copy
import io
import random

import numpy as np
import pytest
import torch

import cnnboost
from cnnboost import _core, reference
from harness import (
    non_contiguous_features, assert_close, assert_fails_cleanly, assert_raises_naming, assert_unchanged, compare,
    randomize_, state_of, twins,
)

DTYPES = [torch.float32, torch.float64]


def random_case(seed):
    rng = random.Random(seed)
    g = rng.choice([1, 2, 3, 4, 5])
    return dict(
        n=rng.randint(2, 9),
        c=g * rng.randint(1, 8),
        k=rng.randint(1, 12),
        num_heads=g,
        spatial=rng.choice([None, (1, 1), (3, 2), (5, 5)]),
    )


def make_x(case, dtype, requires_grad=True):
    shape = (case["n"], case["c"]) + (case["spatial"] or ())
    return lambda: [torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)]


def ssm_twins(case, dtype, seed, **kwargs):
    return twins(cnnboost.SSM, reference.SSM, case["c"], case["k"], case["num_heads"], dtype=dtype, seed=seed,
                 **kwargs)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_channels_last_maps_match_reference(dtype, train, seed):
    """A channels_last map is pooled in its own memory order, and its gradient keeps
    that layout, as the reference's does."""
    case = dict(random_case(300 + seed), spatial=random.Random(seed).choice([(3, 2), (5, 5), (7, 7)]))
    fast, ref = ssm_twins(case, dtype, seed)
    made = []

    def make():
        x = torch.randn((case["n"], case["c"]) + case["spatial"], dtype=dtype)
        made.append(x.contiguous(memory_format=torch.channels_last).requires_grad_())
        return made[-1:]

    compare(fast, ref, make, train=train)
    if case["c"] > 1:
        assert made[0].grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_last_head", [False, True])
@pytest.mark.parametrize("outputs", ["ensemble", "all"])
@pytest.mark.parametrize("seed", range(6))
def test_train_matches_reference(dtype, norm_last_head, outputs, seed):
    case = random_case(seed)
    fast, ref = ssm_twins(case, dtype, seed, norm_last_head=norm_last_head, outputs=outputs)
    out, _ = compare(fast, ref, make_x(case, dtype), train=True)
    g, n, k = case["num_heads"], case["n"], case["k"]
    assert out.shape == ((g, n, k) if outputs == "all" else (n, k))
    assert all(bn.num_batches_tracked.item() == 1 for bn in fast.bns)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_last_head", [False, True])
@pytest.mark.parametrize("outputs", ["ensemble", "all"])
@pytest.mark.parametrize("seed", range(4))
def test_eval_matches_reference(dtype, norm_last_head, outputs, seed):
    case = random_case(100 + seed)
    case["n"] = random.Random(seed).randint(1, 6)  # eval takes a batch of 1
    fast, ref = ssm_twins(case, dtype, seed, norm_last_head=norm_last_head, outputs=outputs)
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    compare(fast, ref, make_x(case, dtype), train=False)
    for k, v in fast.state_dict().items():  # eval leaves the running statistics alone
        assert torch.equal(v, before[k]), k


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("spatial", [None, (2, 2)])
def test_training_steps_in_a_row_keep_running_stats_equal(dtype, momentum, spatial):
    case = dict(n=6, c=12, k=5, num_heads=3, spatial=spatial)
    fast, ref = ssm_twins(case, dtype, 7, momentum=momentum)
    opt_f = torch.optim.SGD(fast.parameters(), lr=0.1)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(4):
        opt_f.zero_grad(), opt_r.zero_grad()
        compare(fast, ref, make_x(case, dtype), train=True)  # checks every buffer
        opt_f.step(), opt_r.step()
    assert [bn.num_batches_tracked.item() for bn in fast.bns] == [4, 4]
    compare(fast, ref, make_x(case, dtype), train=False)


def test_ensemble_is_the_mean_of_all_heads():
    fast = randomize_(cnnboost.SSM(24, 7, 4, outputs="ensemble"))
    fast.eval()
    x = torch.randn(5, 24)
    mean_logits = fast(x)
    fast.outputs = "all"
    torch.testing.assert_close(mean_logits, fast(x).mean(0))


def test_last_head_is_raw_by_default():
    """Without norm_last_head the last head is Linear(C → K) on the pooled feature."""
    m = randomize_(cnnboost.SSM(8, 3, 2, outputs="all", dtype=torch.float64))
    x = torch.randn(4, 8, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(m(x)[1], m.fcs[1](x.mean((2, 3))))
    assert len(m.bns) == 1 and len(cnnboost.SSM(8, 3, 2, norm_last_head=True).bns) == 2


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("outputs", ["ensemble", "all"])
@pytest.mark.parametrize("spatial", [None, (2, 3), "channels_last"])
@pytest.mark.parametrize("norm_last_head", [False, True])
def test_gradcheck(train, outputs, spatial, norm_last_head):
    fast = cnnboost.SSM(6, 3, 3, norm_last_head=norm_last_head, outputs=outputs, dtype=torch.float64)
    randomize_(fast, 1)
    fast.train(train)
    if spatial == "channels_last":
        x = torch.randn(4, 6, 2, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
    else:
        x = torch.randn((4, 6) + (spatial or ()), dtype=torch.float64, requires_grad=True)
    names = sorted(k for k, _ in fast.named_parameters())
    params = [dict(fast.named_parameters())[k] for k in names]

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(fast, dict(zip(names, ps))):
            return fast(x)

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded"])
@pytest.mark.parametrize("train", [True, False])
def test_non_contiguous_inputs(layout, train):
    fast, ref = twins(cnnboost.SSM, reference.SSM, 12, 5, 3, dtype=torch.float64)

    compare(fast, ref, lambda: [non_contiguous_features(layout)], train=train)

@pytest.mark.usefixtures("each_backend")

def test_state_dict_keys_and_loading_from_the_reference():
    m = cnnboost.SSM(8, 3, num_heads=2)
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert list(m.state_dict()) == [f"bns.0.{k}" for k in bn] + [
        "fcs.0.weight", "fcs.0.bias", "fcs.1.weight", "fcs.1.bias",
    ]
    assert isinstance(m.bns[0], torch.nn.BatchNorm1d) and m.bns[0].num_features == 4
    assert m.fcs[0].weight.shape == (3, 4) and m.fcs[1].weight.shape == (3, 8)
    # A trained reference checkpoint loads into the fast module and gives its results.
    ref = randomize_(reference.SSM(8, 3, num_heads=2), 5)
    ref.train()
    ref(torch.randn(6, 8))
    m.load_state_dict(ref.state_dict())
    m.eval(), ref.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(m(x), ref(x))
    assert m.bns[0].num_batches_tracked.item() == 1
    reference.SSM(8, 3, num_heads=2).load_state_dict(m.state_dict())


def _reference_from_arrays(c, k, g, fw, fb, bw, bb, rm, rv):
    ref = reference.SSM(c, k, g, dtype=torch.float64)
    with torch.no_grad():
        for h, fc in enumerate(ref.fcs):
            fc.weight.copy_(torch.from_numpy(fw[h]))
            fc.bias.copy_(torch.from_numpy(fb[h]))
        for h, bn in enumerate(ref.bns):
            bn.weight.copy_(torch.from_numpy(bw[h]))
            bn.bias.copy_(torch.from_numpy(bb[h]))
            bn.running_mean.copy_(torch.from_numpy(rm[h]))
            bn.running_var.copy_(torch.from_numpy(rv[h]))
    return ref


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("training", [True, False])
def test_numpy_only_core_matches_reference(training):
    """A NumPy user calls _core directly: forward, backward, statistics."""
    rng = np.random.default_rng(0)
    n, c, k, g = 6, 12, 4, 3
    widths = [4, 8, 12]
    x = rng.standard_normal((n, c, 2, 2))
    fw = [rng.standard_normal((k, w)) for w in widths]
    fb = [rng.standard_normal(k) for _ in widths]
    bw = [1 + 0.3 * rng.standard_normal(w) for w in widths[:2]]
    bb = [0.2 * rng.standard_normal(w) for w in widths[:2]]
    rm = [0.3 * rng.standard_normal(w) for w in widths[:2]]
    rv = [0.5 + rng.random(w) for w in widths[:2]]
    core = _core.SSM(g)
    assert (core.num_heads, core.norm_last_head, core.normalised_heads) == (3, False, 2)
    out, mean, invstd, var, pooled = core.forward(x, fw, fb, bw, bb, rm, rv, training=training)
    assert isinstance(out, np.ndarray) and out.shape == (n, k) and out.dtype == np.float64
    np.testing.assert_allclose(pooled, x.mean((2, 3)), rtol=1e-12)
    assert mean.shape == invstd.shape == (4 + 8,)
    if training:
        f = pooled[:, :8]
        np.testing.assert_allclose(mean, np.concatenate([f[:, :4].mean(0), f.mean(0)]), rtol=1e-12)
        np.testing.assert_allclose(var, np.concatenate([f[:, :4].var(0, ddof=1), f.var(0, ddof=1)]), rtol=1e-12)
        np.testing.assert_allclose(invstd[4:], 1 / np.sqrt(f.var(0) + 1e-5), rtol=1e-12)
    else:
        assert var.shape == (0,)
        np.testing.assert_array_equal(mean, np.concatenate(rm))
    grad = rng.standard_normal((n, k))
    gx, gfw, gfb, gbw, gbb = core.backward(grad, pooled, mean, invstd, fw, fb, bw, bb, hw=4, training=training)
    assert [a.shape for a in gfw] == [(k, w) for w in widths] and len(gbw) == 2

    ref = _reference_from_arrays(c, k, g, fw, fb, bw, bb, rm, rv).train(training)
    xt = torch.from_numpy(x).requires_grad_()
    y = ref(xt)
    (y * torch.from_numpy(grad)).sum().backward()
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.broadcast_to(gx[:, :, None, None], x.shape), xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    for h in range(g):
        np.testing.assert_allclose(gfw[h], ref.fcs[h].weight.grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gfb[h], ref.fcs[h].bias.grad.numpy(), rtol=1e-9, atol=1e-12)
    for h in range(2):
        np.testing.assert_allclose(gbw[h], ref.bns[h].weight.grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gbb[h], ref.bns[h].bias.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_core_all_outputs_and_torch_tensors_through_dlpack():
    core = _core.SSM(2, norm_last_head=True)
    x = torch.randn(3, 4)
    fw, fb = [torch.randn(5, 2), torch.randn(5, 4)], [torch.zeros(5), torch.ones(5)]
    bw, bb = [torch.ones(2), torch.ones(4)], [torch.zeros(2), torch.zeros(4)]
    rm, rv = [torch.zeros(2), torch.zeros(4)], [torch.ones(2), torch.ones(4)]
    out, *_ = core.forward(x, fw, fb, bw, bb, rm, rv, outputs="all")
    as_np = lambda ts: [t.numpy() for t in ts]  # noqa: E731
    out_np, *_ = core.forward(x.numpy(), as_np(fw), as_np(fb), tuple(as_np(bw)), as_np(bb), as_np(rm), as_np(rv),
                              outputs="all")
    assert out.shape == (2, 3, 5) and out.dtype == np.float32
    np.testing.assert_array_equal(out, out_np)
    assert repr(core).startswith("SSM(num_heads=2, norm_last_head=True, eps=")


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(num_heads=0), "num_heads"),
        (dict(num_heads=-2), "num_heads"),
        (dict(num_heads=2.0), "num_heads"),
        (dict(num_heads=3), "in_features"),  # 8 channels do not split into 3
        (dict(norm_last_head="yes"), "norm_last_head"),
        (dict(outputs="mean"), "outputs"),
        (dict(eps=float("nan")), "eps"),
        (dict(eps=0.0), "eps"),
        (dict(momentum=1.5), "momentum"),
        (dict(momentum=float("nan")), "momentum"),
        (dict(in_features=0), "in_features"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_constructor_arguments(kwargs, arg):
    args = dict(in_features=8, num_classes=3) | kwargs
    with pytest.raises((ValueError, TypeError), match=arg):
        cnnboost.SSM(**args)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: torch.randn(4, 9), ValueError, ["x", "8", "(4, 9)"]),
        (lambda: torch.randn(4, 6, 2, 2), ValueError, ["x", "8", "(4, 6, 2, 2)"]),
        (lambda: torch.randn(4, 8, 2), ValueError, ["x", "2-d", "(4, 8, 2)"]),
        (lambda: torch.randn(8), ValueError, ["x", "2-d", "(8,)"]),
        (lambda: torch.randn(4, 8, dtype=torch.float64), TypeError, ["x", "float32", "float64"]),
        (lambda: torch.randn(4, 8).half(), TypeError, ["x", "float16"]),
        (lambda: torch.ones(4, 8, dtype=torch.int64), TypeError, ["x", "int64"]),
        (lambda: np.ones((4, 8), dtype=np.float32), TypeError, ["x", "Tensor", "ndarray"]),
        (lambda: torch.randn(4, 8, 0, 3), ValueError, ["x", "H×W", "(4, 8, 0, 3)"]),
        (lambda: torch.empty(4, 8, device="meta"), ValueError, ["x", "device cpu", "meta"]),
    ],
)
def test_bad_input_raises_and_changes_nothing(make, exc, words, train):
    m = randomize_(cnnboost.SSM(8, 3, num_heads=2)).train(train)
    m(torch.randn(4, 8)).sum().backward()  # a grad and a counted batch to preserve
    assert_fails_cleanly(m, lambda: m(make()), exc, words)


@pytest.mark.parametrize("shape", [(1, 8), (1, 8, 3, 3), (0, 8)])
def test_training_needs_two_samples_and_counts_no_failed_batch(shape):
    m = randomize_(cnnboost.SSM(8, 3, num_heads=4))
    before = state_of(m)
    with pytest.raises(ValueError, match="x: expected more than 1 value per channel when training") as info:
        m(torch.randn(shape))
    assert str(tuple(shape)) in str(info.value)
    assert_unchanged(m, before)
    # In eval, or with no batch norm at all (one raw head), any batch size works.
    assert m.eval()(torch.randn(shape)).shape == (shape[0], 3)
    raw = cnnboost.SSM(8, 3, num_heads=1).train()
    assert raw(torch.randn(shape)).shape == (shape[0], 3)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda c, a: c.forward(a["x"][:, :7], *a["params"]), ValueError, ["x", "num_heads = 2", "(5, 7)"]),
        (lambda c, a: c.forward(a["x"][:, :4], *a["params"]), ValueError, ["fc_weights[0]", "(3, 2)", "(3, 4)"]),
        (lambda c, a: c.forward(a["x"][0], *a["params"]), ValueError, ["x", "2-d", "(8,)"]),
        (lambda c, a: c.forward(a["x"], a["fw"][:1], *a["params"][1:]), ValueError, ["fc_weights", "length 2", "got length 1"]),
        (lambda c, a: c.forward(a["x"], a["fw"][0], *a["params"][1:]), TypeError, ["fc_weights", "list", "ndarray"]),
        (lambda c, a: c.forward(a["x"], a["fw"], [a["fb"][0], a["fb"][1][:2]], *a["params"][2:]), ValueError, ["fc_biases[1]", "(3,)", "(2,)"]),
        (lambda c, a: c.forward(a["x"], a["fw"][::-1], *a["params"][1:]), ValueError, ["fc_weights[0]", "(3, 8)"]),
        (lambda c, a: c.forward(a["x"], a["fw"], a["fb"], [], *a["params"][3:]), ValueError, ["bn_weights", "length 1", "got length 0"]),
        (lambda c, a: c.forward(a["x"], *a["params"][:5], [a["x"][0]]), ValueError, ["running_vars[0]", "(4,)", "(8,)"]),
        (lambda c, a: c.forward(a["x"], *a["params"][:5], [a["x"][0, :4].astype(np.float64)]), TypeError, ["running_vars[0]", "float32", "float64"]),
        (lambda c, a: c.forward(a["x"].astype(np.float16), *a["params"]), TypeError, ["x", "float16"]),
        (lambda c, a: c.forward(a["x"], *a["params"], outputs="every"), ValueError, ["outputs", "every"]),
        (lambda c, a: c.forward(a["x"][:1], *a["params"]), ValueError, ["x", "more than 1 value per channel"]),
        (lambda c, a: c.backward(a["out"][:, :2], a["x"], a["mean"], a["invstd"], *a["params"][:4]), ValueError, ["grad_out", "(5, 3)", "(5, 2)"]),
        (lambda c, a: c.backward(a["out"], a["x"], a["mean"][:3], a["invstd"], *a["params"][:4]), ValueError, ["mean", "(4,)", "(3,)"]),
        (lambda c, a: c.backward(a["out"], a["x"], a["mean"], a["invstd"][:0], *a["params"][:4]), ValueError, ["invstd", "(4,)"]),
        (lambda c, a: c.backward(a["out"], a["x"][:, :7], a["mean"], a["invstd"], *a["params"][:4]), ValueError, ["pooled", "num_heads"]),
        (lambda c, a: c.backward(a["out"], a["x"], a["mean"], a["invstd"], *a["params"][:4], hw=0), ValueError, ["hw"]),
        (lambda c, a: c.backward(a["out"], a["x"], a["mean"], a["invstd"], *a["params"][:4], outputs="all"), ValueError, ["grad_out", "(2, 5, 3)"]),
        (lambda c, a: _core.SSM(0), ValueError, ["num_heads"]),
        (lambda c, a: _core.SSM(2, False, float("inf")), ValueError, ["eps"]),
    ],
)
def test_core_bad_arguments(call, exc, words):
    rng = np.random.default_rng(1)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    a = dict(x=f32(5, 8), fw=[f32(3, 4), f32(3, 8)], fb=[f32(3), f32(3)], bw=[f32(4)], bb=[f32(4)],
             rm=[f32(4)], rv=[np.abs(f32(4)) + 0.5])
    a["params"] = [a["fw"], a["fb"], a["bw"], a["bb"], a["rm"], a["rv"]]
    core = _core.SSM(2)
    a["out"], a["mean"], a["invstd"], _, _ = core.forward(a["x"], *a["params"])
    flat = lambda: [np.array(v, copy=True) for v in [a["x"], a["out"], a["mean"], *sum(a["params"], [])]]  # noqa: E731
    originals = flat()
    assert_raises_naming(lambda: call(core, a), exc, words)
    for now, then in zip(flat(), originals):
        np.testing.assert_array_equal(now, then)


def test_outputs_are_fresh_tensors():
    m = cnnboost.SSM(8, 3, num_heads=2)
    x = torch.randn(4, 8)
    y1, y2 = m(x), m(x)
    assert y1.data_ptr() != y2.data_ptr()
    assert not np.shares_memory(y1.detach().numpy(), x.numpy())

@pytest.mark.usefixtures("each_backend")

def test_nan_propagates_like_the_reference():
    fast, ref = twins(cnnboost.SSM, reference.SSM, 8, 3, 2, dtype=torch.float64)
    fast.eval(), ref.eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    x[1, 2] = float("nan")
    torch.testing.assert_close(fast(x), ref(x), equal_nan=True)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_heads=4), dict(num_heads=1, outputs="all"), dict(num_heads=2, norm_last_head=True, momentum=None)],
)
def test_torch_compile_fullgraph_matches_eager(kwargs):
    torch._dynamo.reset()
    eager = randomize_(cnnboost.SSM(16, 5, **kwargs))
    m = copy.deepcopy(eager)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # training steps: output, grads and running statistics
        x = torch.randn(6, 16, 2, 2)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = compiled(xc)
        y.square().sum().backward()
        ye = eager(xe)
        ye.square().sum().backward()
        assert_close(y, ye, torch.float32, "compiled output")
        assert_close(xc.grad, xe.grad, torch.float32, "compiled grad")
        for (name, a), (_, b) in zip(m.named_parameters(), eager.named_parameters()):
            assert_close(a.grad, b.grad, torch.float32, f"compiled grad of {name}")
        for (name, a), (_, b) in zip(m.named_buffers(), eager.named_buffers()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert all(bn.num_batches_tracked.item() == 2 for bn in m.bns)
    m.eval(), eager.eval()
    x = torch.randn(3, 16)
    assert_close(compiled(x), eager(x), torch.float32, "compiled eval output")


def test_autocast_inputs_are_computed_in_float32():
    m = cnnboost.SSM(8, 3, num_heads=2)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.to(torch.bfloat16))
    assert y.dtype == torch.float32
    m.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.to(torch.bfloat16))
    torch.testing.assert_close(y, m(x.to(torch.bfloat16).float()))


def test_deepcopy_pickle_and_repr():
    m = randomize_(cnnboost.SSM(8, 3, num_heads=2, norm_last_head=True, outputs="all", momentum=None)).eval()
    x = torch.randn(5, 8)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(m), torch.load(buf, weights_only=False)):
        assert repr(clone) == repr(m)
        torch.testing.assert_close(clone(x), m(x))
    assert "num_heads=2, norm_last_head=True, outputs='all'" in repr(m)
    assert m.bns[0].momentum is None
