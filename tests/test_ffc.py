"""FFC against the pure-torch reference, through every layer: torch module, custom
ops, `_core` with NumPy, and bad input."""

import math
import random

import numpy as np
import pytest
import torch

import cnnboost
from cnnboost import _core, reference
from harness import non_contiguous_features, assert_close, assert_fails_cleanly, assert_raises_naming, compare, twins

DTYPES = [torch.float32, torch.float64]


def random_case(seed):
    rng = random.Random(seed)
    return dict(
        n=rng.randint(1, 9),
        c=rng.randint(2, 40),
        k=rng.randint(1, 12),
        num_filters=rng.randint(1, 4),
        spatial=rng.choice([None, (1, 1), (3, 2), (5, 5)]),
    )


def make_x(case, dtype, requires_grad=True):
    shape = (case["n"], case["c"]) + (case["spatial"] or ())
    return lambda: [torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)]


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combine", ["paper", "plain"])
@pytest.mark.parametrize("outputs", ["ensemble", "all"])
@pytest.mark.parametrize("seed", range(6))
def test_train_matches_reference(dtype, combine, outputs, seed):
    case = random_case(seed)
    fast, ref = twins(cnnboost.FFC, reference.FFC, case["c"], case["k"], case["num_filters"],
                      combine=combine, outputs=outputs, dtype=dtype, seed=seed)
    out, _ = compare(fast, ref, make_x(case, dtype), train=True)
    j = fast.num_outputs
    assert out.shape == ((j, case["n"], case["k"]) if outputs == "all" else (case["n"], case["k"]))


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eval_ensemble", ["mean", "vote"])
@pytest.mark.parametrize("combine", ["paper", "plain"])
@pytest.mark.parametrize("seed", range(4))
def test_eval_matches_reference(dtype, eval_ensemble, combine, seed):
    case = random_case(100 + seed)
    fast, ref = twins(cnnboost.FFC, reference.FFC, case["c"], case["k"], case["num_filters"],
                      combine=combine, eval_ensemble=eval_ensemble, dtype=dtype, seed=seed)
    out, out_ref = compare(fast, ref, make_x(case, dtype), train=False)
    if eval_ensemble == "vote":
        assert not out.requires_grad
        assert torch.equal(out.argmax(1), out_ref.argmax(1))


def test_fast_ensemble_is_the_mean_of_all_outputs():
    """The linearity shortcut (one product) equals averaging the J separate outputs."""
    fast = cnnboost.FFC(24, 7, 3)
    x = torch.randn(5, 24)
    mean_logits = fast(x)
    fast.outputs = "all"
    torch.testing.assert_close(mean_logits, fast(x).mean(0))


def test_vote_rule_reference_by_hand():
    # Two outputs disagree (1:1 tie): the more confident one (class 1) wins.
    outs = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 5.0, 0.0]]])
    assert reference.vote_scores(outs).argmax(1).item() == 1
    # Majority beats confidence: two weak votes for class 2 beat one sure vote for 0.
    outs = torch.tensor([[[0.0, 0.0, 0.1]], [[0.0, 0.0, 0.2]], [[9.0, 0.0, 0.0]]])
    scores = reference.vote_scores(outs)
    assert scores.argmax(1).item() == 2
    assert math.floor(scores[0, 2].item()) == 2


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("dtype", DTYPES)
def test_vote_ties_follow_the_most_confident_output(dtype):
    """With two outputs (plain, one filter) half the samples are ties."""
    fast, ref = twins(cnnboost.FFC, reference.FFC, 16, 4, 1, combine="plain", dtype=dtype, seed=3)
    fast.eval(), ref.eval()
    x = torch.randn(400, 16, dtype=dtype)
    ref.outputs = "all"
    outs = ref(x)
    winners = outs.argmax(-1)
    ties = winners[0] != winners[1]
    assert ties.sum() > 20
    conf = torch.softmax(outs, -1).amax(-1)
    expected = torch.where(conf[0] >= conf[1], winners[0], winners[1])
    assert torch.equal(fast(x).argmax(1), expected)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["train", "eval-mean", "vote"])
@pytest.mark.parametrize("seed", range(4))
def test_channels_last_maps_match_reference(dtype, mode, seed):
    """A channels_last map is pooled in its own memory order, and its gradient keeps
    that layout, as the reference's does."""
    case = dict(random_case(200 + seed), spatial=random.Random(seed).choice([(3, 2), (5, 5), (7, 7)]))
    ensemble = "vote" if mode == "vote" else "mean"
    fast, ref = twins(cnnboost.FFC, reference.FFC, case["c"], case["k"], case["num_filters"],
                      eval_ensemble=ensemble, dtype=dtype, seed=seed)
    made = []

    def make():
        x = torch.randn((case["n"], case["c"]) + case["spatial"], dtype=dtype)
        made.append(x.contiguous(memory_format=torch.channels_last).requires_grad_())
        return made[-1:]

    out, out_ref = compare(fast, ref, make, train=mode == "train")
    if mode == "vote":
        assert torch.equal(out.argmax(1), out_ref.argmax(1))
    if made[0].grad is not None:
        assert made[0].grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("outputs", ["ensemble", "all"])
@pytest.mark.parametrize("spatial", [None, (2, 3), "channels_last"])
@pytest.mark.parametrize("combine", ["paper", "plain"])
def test_gradcheck(outputs, spatial, combine):
    fast = cnnboost.FFC(6, 3, 2, combine=combine, outputs=outputs, dtype=torch.float64)
    from harness import randomize_
    randomize_(fast, 1)
    if spatial == "channels_last":
        x = torch.randn(4, 6, 2, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
    else:
        x = torch.randn((4, 6) + (spatial or ()), dtype=torch.float64, requires_grad=True)
    params = [p for _, p in sorted(fast.named_parameters())]

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
            fast, dict(zip(sorted(k for k, _ in fast.named_parameters()), ps))
        ):
            return fast(x)

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.usefixtures("each_backend")
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded"])
def test_non_contiguous_inputs(layout):
    fast, ref = twins(cnnboost.FFC, reference.FFC, 12, 5, 3, dtype=torch.float64)

    compare(fast, ref, lambda: [non_contiguous_features(layout)], train=True)


def test_state_dict_uses_the_authors_layout():
    m = cnnboost.FFC(8, 3)
    assert list(m.state_dict()) == [
        "filter1.weight", "filter1.bias", "filter2.weight", "filter2.bias",
        "filter3.weight", "filter3.bias", "fc.weight", "fc.bias",
    ]
    assert m.fc.weight.shape == (3, 8) and m.filter2.weight.shape == (8,)
    # ModuleList-style keys (0-based) load too.
    src = {k.replace("filter1.", "filters.0.").replace("filter3.", "filters.2."): torch.randn_like(v)
           for k, v in m.state_dict().items()}
    m.load_state_dict(src)
    assert torch.equal(m.filter3.bias, src["filters.2.bias"])
    # The reference loads the fast module's checkpoint, and back.
    r = reference.FFC(8, 3)
    r.load_state_dict(m.state_dict())

@pytest.mark.usefixtures("each_backend")

def test_numpy_only_core_matches_reference():
    """A NumPy user calls _core directly: forward, backward, vote."""
    rng = np.random.default_rng(0)
    n, c, k, nf = 6, 10, 4, 3
    x = rng.standard_normal((n, c, 2, 2))
    lw, lb = 1 + 0.3 * rng.standard_normal((nf, c)), 0.2 * rng.standard_normal((nf, c))
    fw, fb = rng.standard_normal((k, c)), rng.standard_normal(k)
    core = _core.FFC(nf, "paper")
    out, pooled = core.forward(x, lw, lb, fw, fb)
    assert isinstance(out, np.ndarray) and out.shape == (n, k) and out.dtype == np.float64
    np.testing.assert_allclose(pooled, x.mean((2, 3)), rtol=1e-12)
    g = rng.standard_normal((n, k))
    gx, glw, glb, gfw, gfb = core.backward(g, pooled, lw, lb, fw, fb, hw=4)

    ref = reference.FFC(c, k, nf, dtype=torch.float64)
    with torch.no_grad():
        for l in range(nf):
            getattr(ref, f"filter{l + 1}").weight.copy_(torch.from_numpy(lw[l]))
            getattr(ref, f"filter{l + 1}").bias.copy_(torch.from_numpy(lb[l]))
        ref.fc.weight.copy_(torch.from_numpy(fw))
        ref.fc.bias.copy_(torch.from_numpy(fb))
    xt = torch.from_numpy(x).requires_grad_()
    (ref(xt) * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(out, ref(xt).detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.broadcast_to(gx[:, :, None, None], x.shape), xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gfw, ref.fc.weight.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(glw[1], ref.filter2.weight.grad.numpy(), rtol=1e-9, atol=1e-12)
    ref.eval()
    np.testing.assert_allclose(core.vote(x, lw, lb, fw, fb), ref(xt).detach().numpy(), rtol=1e-12)


def test_core_reads_torch_tensors_through_dlpack():
    core = _core.FFC(2, "plain")
    x, lw, lb = torch.randn(3, 5), torch.ones(2, 5), torch.zeros(2, 5)
    fw, fb = torch.randn(4, 5), torch.zeros(4)
    out, *_ = core.forward(x, lw, lb, fw, fb)
    out_np, *_ = core.forward(x.numpy(), lw.numpy(), lb.numpy(), fw.numpy(), fb.numpy())
    np.testing.assert_array_equal(out, out_np)
    assert "FFC(num_filters=2, combine='plain'" in repr(core)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(num_filters=0), "num_filters"),
        (dict(combine="mean"), "combine"),
        (dict(eval_ensemble="max"), "eval_ensemble"),
        (dict(outputs="some"), "outputs"),
        (dict(eps=float("nan")), "eps"),
        (dict(eps=-1.0), "eps"),
        (dict(in_features=0), "in_features"),
        (dict(num_classes=2.5), "num_classes"),
    ],
)
def test_bad_constructor_arguments(kwargs, arg):
    args = dict(in_features=8, num_classes=3) | kwargs
    with pytest.raises((ValueError, TypeError), match=arg):
        cnnboost.FFC(**args)


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: torch.randn(4, 9), ValueError, ["x", "8", "(4, 9)"]),
        (lambda: torch.randn(4, 8, 2), ValueError, ["x", "2-d", "(4, 8, 2)"]),
        (lambda: torch.randn(4, 8, dtype=torch.float64), TypeError, ["x", "float32", "float64"]),
        (lambda: torch.randn(4, 8).half(), TypeError, ["x", "float16"]),
        (lambda: torch.ones(4, 8, dtype=torch.int64), TypeError, ["x", "int64"]),
        (lambda: np.ones((4, 8), dtype=np.float32), TypeError, ["x", "Tensor", "ndarray"]),
    ],
)
def test_bad_input_raises_and_changes_nothing(make, exc, words):
    m = cnnboost.FFC(8, 3)
    assert_fails_cleanly(m, lambda: m(make()), exc, words)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda c, a: c.forward(a["x"][:, :4], a["lw"], a["lb"], a["fw"], a["fb"]), ValueError, ["ln_weight", "(3, 4)", "(3, 8)"]),
        (lambda c, a: c.forward(a["x"], a["lw"][:2], a["lb"], a["fw"], a["fb"]), ValueError, ["ln_weight", "(2, 8)"]),
        (lambda c, a: c.forward(a["x"], a["lw"], a["lb"], a["fw"], a["fb"][:2]), ValueError, ["fc_bias", "(3,)", "(2,)"]),
        (lambda c, a: c.forward(a["x"], a["lw"].astype(np.float64), a["lb"], a["fw"], a["fb"]), TypeError, ["ln_weight", "float32"]),
        (lambda c, a: c.forward(a["x"].astype(np.int32), a["lw"], a["lb"], a["fw"], a["fb"]), TypeError, ["x", "int32"]),
        (lambda c, a: c.forward("x", a["lw"], a["lb"], a["fw"], a["fb"]), TypeError, ["x", "str"]),
        (lambda c, a: c.forward(a["x"], a["lw"], a["lb"], a["fw"], a["fb"], outputs="every"), ValueError, ["outputs", "every"]),
        (lambda c, a: c.backward(a["x"][:, :2], a["x"], a["lw"], a["lb"], a["fw"], a["fb"]), ValueError, ["grad_out", "(5, 3)"]),
        (lambda c, a: c.backward(a["out"], a["x"][:, :2], a["lw"], a["lb"], a["fw"], a["fb"]), ValueError, ["ln_weight", "(3, 2)"]),
        (lambda c, a: c.backward(a["out"], a["x"][0], a["lw"], a["lb"], a["fw"], a["fb"]), ValueError, ["pooled", "2-d", "(8,)"]),
        (lambda c, a: c.backward(a["out"], a["x"], a["lw"], a["lb"], a["fw"], a["fb"], hw=0), ValueError, ["hw"]),
        (lambda c, a: _core.FFC(0), ValueError, ["num_filters"]),
        (lambda c, a: _core.FFC(2, "x"), ValueError, ["combine"]),
        (lambda c, a: _core.FFC(2, "plain", float("inf")), ValueError, ["eps"]),
    ],
)
def test_core_bad_arguments(call, exc, words):
    rng = np.random.default_rng(1)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    a = dict(x=f32(5, 8), lw=f32(3, 8), lb=f32(3, 8), fw=f32(3, 8), fb=f32(3))
    core = _core.FFC(3, "paper")
    a["out"], _ = core.forward(a["x"], a["lw"], a["lb"], a["fw"], a["fb"])
    originals = {k: v.copy() for k, v in a.items()}
    assert_raises_naming(lambda: call(core, a), exc, words)
    for k in a:
        np.testing.assert_array_equal(a[k], originals[k])


def test_outputs_are_fresh_arrays():
    m = cnnboost.FFC(8, 3)
    x = torch.randn(4, 8)
    y1, y2 = m(x), m(x)
    assert y1.data_ptr() != y2.data_ptr()
    assert not np.shares_memory(y1.detach().numpy(), x.numpy())


def test_empty_batch():
    m = cnnboost.FFC(8, 3)
    assert m(torch.randn(0, 8)).shape == (0, 3)
    m.eval()
    assert m(torch.randn(0, 8, 2, 2)).shape == (0, 3)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    m = cnnboost.FFC(16, 5, outputs="ensemble")
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 16, 2, 2, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    assert_close(y, m(x), torch.float32, "compiled output")
    m(x).sum().backward()
    assert_close(g, x.grad, torch.float32, "compiled grad")
    m.eval()
    assert torch.equal(compiled(x), m(x))


def test_autocast_inputs_are_computed_in_float32():
    m = cnnboost.FFC(8, 3)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.to(torch.bfloat16))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, m(x.to(torch.bfloat16).float()))


def test_deepcopy_pickle_and_state_dict_round_trips():
    import copy

    m = cnnboost.FFC(8, 3, num_filters=2, combine="plain", eval_ensemble="mean")
    x = torch.randn(5, 8)
    for clone in (copy.deepcopy(m), torch.load(_saved(m), weights_only=False)):
        assert repr(clone) == repr(m)
        torch.testing.assert_close(clone(x), m(x))
    fresh = cnnboost.FFC(8, 3, num_filters=2, combine="plain", eval_ensemble="mean")
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x), m(x))
    assert "combine='plain'" in repr(m) and "eval_ensemble='mean'" in repr(m)


def _saved(m):
    import io

    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return buf
