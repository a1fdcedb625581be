"""The torch-ops route (``cnnboost.torch_ops``): the modules computing with torch's
own ops, on their own parameters and buffers, where the kernels cannot serve —
double backward, ``torch.jit.trace``, ONNX export, ``torch.func`` transforms. Each
test compares that route with the kernels' route on the same module state, and
checks that the feature needing torch ops works (or, on the kernels' route, fails
with an error that says what to do rather than giving a wrong answer)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.func import functional_call, grad, vmap

import cnnboost
from cnnboost import _torch
from harness import assert_close, randomize_

N = 6


def _maps(dtype, m=1):
    return [torch.randn(N, 8, 3, 4, dtype=dtype) for _ in range(m)]


# name -> (module factory, inputs factory, call); every module at a small shape.
CASES = {
    "ffc": (lambda dt: cnnboost.FFC(12, 5, eval_ensemble="mean", dtype=dt), lambda dt: [torch.randn(N, 12, dtype=dt)]),
    "ffc_map": (lambda dt: cnnboost.FFC(8, 5, combine="plain", eval_ensemble="mean", dtype=dt), lambda dt: _maps(dt)),
    "ssm": (lambda dt: cnnboost.SSM(12, 5, num_heads=3, dtype=dt), lambda dt: [torch.randn(N, 12, dtype=dt)]),
    "ssm_all": (lambda dt: cnnboost.SSM(8, 3, norm_last_head=True, outputs="all", dtype=dt), lambda dt: _maps(dt)),
    "ab": (lambda dt: cnnboost.AB(8, dtype=dt), lambda dt: _maps(dt)),
    "ab_plus": (lambda dt: cnnboost.AB(8, groups=1, bias=True, dtype=dt), lambda dt: _maps(dt)),
    "afi": (lambda dt: cnnboost.AFI(8, reduction=2, bias=True, dtype=dt), lambda dt: [_maps(dt, 3)]),
}
BATCH_NORMED = {"ssm", "ssm_all", "ab", "ab_plus"}  # in training their output mixes the batch


def _make(case, dtype, seed=0):
    torch.manual_seed(seed)
    make, inputs = CASES[case]
    return randomize_(make(dtype), seed), inputs(dtype)


def _leaves(inputs):
    return [t for v in inputs for t in (v if isinstance(v, list) else [v])]


def _fresh(inputs):
    """Equal copies of the inputs, as leaves that require grad."""
    return [[t.detach().clone().requires_grad_() for t in v] if isinstance(v, list)
            else v.detach().clone().requires_grad_() for v in inputs]


class NoKernels:
    """Makes every kernel op raise: proves a call never reached the extension."""

    def __init__(self, monkeypatch):
        def refuse(op, *args):
            raise AssertionError(f"{op.name} was called inside cnnboost.torch_ops()")

        monkeypatch.setattr(_torch.KernelOp, "__call__", refuse)


def _step(module, inputs, weight):
    out = module(*inputs)
    (out * weight).sum().backward()
    return out.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_ops_take_the_kernels_step(case, train, dtype, monkeypatch):
    """One step inside torch_ops() and one on the kernels, from equal states: equal
    outputs, input and parameter gradients, and running statistics, and no kernel
    called inside."""
    kernels, inputs = _make(case, dtype)
    ops = copy.deepcopy(kernels)
    kernels.train(train)
    ops.train(train)
    inputs_k, inputs_o = _fresh(inputs), _fresh(inputs)
    weight = torch.randn(kernels(*inputs).shape, dtype=dtype)
    kernels.load_state_dict(ops.state_dict())  # undo the probe call's running update

    out_k = _step(kernels, inputs_k, weight)
    with monkeypatch.context() as patch:
        NoKernels(patch)
        with cnnboost.torch_ops():
            out_o = _step(ops, inputs_o, weight)

    assert_close(out_o, out_k, dtype, "output")
    grads = [t.grad for t in _leaves(inputs_k)] + [p.grad for p in kernels.parameters()]
    scale = max(g.abs().max().item() for g in grads)
    for i, (a, b) in enumerate(zip(_leaves(inputs_o), _leaves(inputs_k))):
        assert_close(a.grad, b.grad, dtype, f"grad of input {i}", scale)
    for (name, p_o), (_, p_k) in zip(ops.named_parameters(), kernels.named_parameters()):
        if train and name == "conv.bias":
            continue  # zero in exact arithmetic (BatchNorm follows): round-off on both sides
        assert_close(p_o.grad, p_k.grad, dtype, f"grad of {name}", scale)
    for (name, b_o), (_, b_k) in zip(ops.named_buffers(), kernels.named_buffers()):
        assert_close(b_o.to(dtype), b_k.to(dtype), dtype, f"buffer {name}")


HALF_TOL = {torch.bfloat16: dict(rtol=4e-2, atol=4e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_half_precision_modules_compute_in_torch_ops(case, train, half):
    """The kernels compute in float32 and float64; a module converted to float16 or
    bfloat16 computes inside torch_ops() (torch's ops take any floating dtype), close
    to the float32 kernels' step from the same state; outside it, the error says
    what to do."""
    kernels, inputs = _make(case, torch.float32)
    with torch.no_grad():  # values a half type holds exactly, so both start equal
        for t in list(kernels.parameters()) + list(kernels.buffers()) + _leaves(inputs):
            t.copy_(t.to(half).to(t.dtype))
    low = copy.deepcopy(kernels).to(half)
    kernels.train(train)
    low.train(train)
    inputs_k, inputs_h = _fresh(inputs), _fresh([[t.to(half) for t in v] if isinstance(v, list) else v.to(half)
                                                 for v in inputs])
    with pytest.raises(TypeError, match=r"float16.*cnnboost\.torch_ops"):
        low(*inputs_h)
    weight = torch.linspace(-1, 1, kernels(*inputs).numel()).view(kernels(*inputs).shape)
    kernels.load_state_dict(copy.deepcopy(low).float().state_dict())  # undo the probe calls' updates
    out_k = _step(kernels, inputs_k, weight)
    with cnnboost.torch_ops():
        out_h = _step(low, inputs_h, weight.to(half))
    assert out_h.dtype == half
    tol = HALF_TOL[half]
    torch.testing.assert_close(out_h.float(), out_k, **tol)
    for (name, b_h), (_, b_k) in zip(low.named_buffers(), kernels.named_buffers()):
        torch.testing.assert_close(b_h.to(b_k.dtype), b_k, **tol)
    # gradients at the scale of the largest (a small one is a sum of cancelling terms)
    grads_k = [t.grad for t in _leaves(inputs_k)] + [p.grad for p in kernels.parameters()]
    grads_h = [t.grad for t in _leaves(inputs_h)] + [p.grad for p in low.parameters()]
    names = [f"input {i}" for i in range(len(_leaves(inputs_k)))] + [n for n, _ in kernels.named_parameters()]
    scale = max(1.0, max(g.abs().max().item() for g in grads_k))
    for name, a, b in zip(names, grads_h, grads_k):
        if not (train and name == "conv.bias"):  # zero in exact arithmetic (BatchNorm follows)
            torch.testing.assert_close(a.float(), b, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                       msg=lambda m, name=name: f"grad of {name}: {m}")


def test_torch_ops_nests_restores_and_decorates():
    assert not _torch.torch_ops_active()
    with cnnboost.torch_ops():
        with cnnboost.torch_ops():
            assert _torch.torch_ops_active()
        assert _torch.torch_ops_active()
    assert not _torch.torch_ops_active()
    with pytest.raises(KeyError):
        with cnnboost.torch_ops():
            raise KeyError("inside")
    assert not _torch.torch_ops_active()

    @cnnboost.torch_ops()
    def active():
        return _torch.torch_ops_active()

    assert active() and not _torch.torch_ops_active()


# -- double backward ---------------------------------------------------------------


def _penalty(module, inputs):
    """A gradient penalty: the squared norm of d(out)/d(inputs), itself to be
    differentiated (create_graph=True)."""
    out = module(*inputs)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), _leaves(inputs), create_graph=True)
    return sum(g.square().sum() for g in grads)


@pytest.mark.parametrize("case", sorted(CASES))
def test_double_backward_on_the_kernels_raises_saying_what_to_do(case):
    """Differentiating the kernels' gradients again would miss this module's
    second-order terms without a word; it raises instead, naming the way out."""
    module, inputs = _make(case, torch.float64)
    penalty = _penalty(module, _fresh(inputs))
    with pytest.raises(RuntimeError, match=r"cnnboost\.torch_ops\(\)") as info:
        penalty.backward()
    assert "double backward" in str(info.value)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_double_backward_under_torch_ops_passes_gradgradcheck(case, train):
    module, inputs = _make(case, torch.float64)
    module.train(train)
    names = [n for n, _ in module.named_parameters()]
    leaves = _leaves(_fresh(inputs))
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def call(*tensors):
        xs, ps = tensors[:len(leaves)], tensors[len(leaves):]
        args = [list(xs)] if case == "afi" else list(xs)
        return functional_call(module, dict(zip(names, ps)), tuple(args))

    with cnnboost.torch_ops():
        assert torch.autograd.gradgradcheck(call, (*leaves, *params))


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_penalty_under_torch_ops_matches_the_reference(case):
    """The second-order gradients reach the parameters as the reference computes them."""
    module, inputs = _make(case, torch.float64)
    twin = getattr(cnnboost.reference, type(module).__name__)
    kwargs = {"ffc": dict(in_features=12, num_classes=5, eval_ensemble="mean"),
              "ffc_map": dict(in_features=8, num_classes=5, combine="plain", eval_ensemble="mean"),
              "ssm": dict(in_features=12, num_classes=5, num_heads=3),
              "ssm_all": dict(in_features=8, num_classes=3, norm_last_head=True, outputs="all"),
              "ab": dict(channels=8), "ab_plus": dict(channels=8, groups=1, bias=True),
              "afi": dict(channels=8, reduction=2, bias=True)}[case]
    ref = twin(**kwargs).double()
    ref.load_state_dict(module.state_dict())
    with cnnboost.torch_ops():
        _penalty(module, _fresh(inputs)).backward()
    _penalty(ref, _fresh(inputs)).backward()
    for (name, p), (_, q) in zip(module.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, q.grad, torch.float64, f"second-order grad of {name}")


# -- torch.jit.trace and ONNX ---------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(CASES) + ["ffc_vote"])
def test_jit_trace_records_torch_ops(case, train):
    """A traced module holds the math in torch ops (no call into the extension, whose
    results the tracer would record as constants) and computes what the module does
    on inputs it was not traced with."""
    module, inputs = _make("ffc" if case == "ffc_vote" else case, torch.float32)
    if case == "ffc_vote":
        module.eval_ensemble = "vote"
    module.train(train)
    traced = torch.jit.trace(copy.deepcopy(module), tuple(inputs), check_trace=False)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::mul" in kinds or "aten::linear" in kinds, kinds
    assert "prim::PythonOp" not in kinds and all(k.startswith(("aten::", "prim::")) for k in kinds), kinds
    assert not _torch.torch_ops_active()
    _, other = _make("ffc" if case == "ffc_vote" else case, torch.float32, seed=1)
    assert_close(traced(*other), module(*other).detach(), torch.float32, "traced output")


@pytest.mark.parametrize("case", sorted(CASES) + ["ffc_vote"])
def test_onnx_export_runs_in_onnxruntime(case):
    """The exported ONNX model (torch's default exporter) computes, in onnxruntime,
    what the module computes in eval mode."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module, inputs = _make("ffc" if case == "ffc_vote" else case, torch.float32)
    if case == "ffc_vote":
        module.eval_ensemble = "vote"
    module.eval()
    program = torch.onnx.export(module, tuple(inputs), dynamo=True, verbose=False)
    assert not _torch.torch_ops_active()
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    _, other = _make("ffc" if case == "ffc_vote" else case, torch.float32, seed=1)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), _leaves(other))}
    (result,) = session.run(None, feeds)
    assert_close(torch.from_numpy(result), module(*other).detach(), torch.float32, "onnxruntime output")


# -- torch.func -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_per_sample_gradients_with_vmap_match_the_kernels(case, dtype):
    """Per-sample parameter gradients by ``vmap(grad(functional_call))`` (as used for
    differential privacy) equal one kernels' backward per sample. Modules that mix
    the batch (batch norms in training) are taken in eval mode, as torch's own are."""
    module, inputs = _make(case, dtype)
    module.train(case not in BATCH_NORMED)
    params = {n: p.detach() for n, p in module.named_parameters()}
    weight = torch.randn(module(*inputs).shape[-1], dtype=dtype)

    def loss(p, *sample):
        args = [[x[None] for x in sample]] if case == "afi" else [x[None] for x in sample]
        return (functional_call(module, p, tuple(args)) * weight).sum()

    per_sample = vmap(grad(loss), in_dims=(None, *[0] * len(_leaves(inputs))))(params, *_leaves(inputs))
    for i in range(N):
        module.zero_grad()
        sample = [[x[i:i + 1] for x in v] if isinstance(v, list) else v[i:i + 1] for v in inputs]
        (module(*sample) * weight).sum().backward()
        scale = max(p.grad.abs().max().item() for p in module.parameters())
        for name, p in module.named_parameters():
            assert_close(per_sample[name][i], p.grad, dtype, f"sample {i}: grad of {name}", scale)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_inside_torch_ops_holds_no_custom_op(case):
    """``torch.export`` inside torch_ops() gives a program of aten ops only (for
    runtimes without Python); outside it, the kernels' custom ops."""
    module, inputs = _make(case, torch.float32)
    module.eval()
    with cnnboost.torch_ops():
        program = torch.export.export(module, tuple(inputs))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert targets and not any("cnnboost" in t for t in targets), targets
    assert any("cnnboost" in str(node.target) for node in torch.export.export(module, tuple(inputs)).graph.nodes)
    _, other = _make(case, torch.float32, seed=1)
    assert_close(program.module()(*other), module(*other).detach(), torch.float32, "exported output")


@pytest.mark.parametrize("case", sorted(CASES))
def test_jit_script_refuses_naming_what_works(case):
    module, _ = _make(case, torch.float32)
    with pytest.raises(RuntimeError, match="torch.jit.trace") as info:
        torch.jit.script(torch.nn.Sequential(module))
    assert type(module).__name__ in str(info.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_mode_ad_matches_the_kernels_jacobian(case):
    """Forward-mode AD (dual tensors) gives J·v, with J from the kernels' backward."""
    import torch.autograd.forward_ad as fwAD

    module, inputs = _make(case, torch.float64)
    module.eval()
    leaves = _leaves(inputs)
    tangents = [torch.randn_like(t) for t in leaves]

    def call(*xs):
        return module(list(xs)) if case == "afi" else module(*xs)

    jacobians = torch.autograd.functional.jacobian(call, tuple(leaves))
    out = call(*leaves)
    expected = sum((j.reshape(out.numel(), -1) @ v.reshape(-1)).view(out.shape) for j, v in zip(jacobians, tangents))
    with fwAD.dual_level():
        dual = call(*[fwAD.make_dual(t, v) for t, v in zip(leaves, tangents)])
        tangent = fwAD.unpack_dual(dual).tangent
    assert_close(tangent, expected, torch.float64, "forward-mode tangent")
