"""CUDA: the candle implementation on the GPU against the torch reference on the GPU
(`pytest -m cuda`; skipped without a GPU and the CUDA build, `cnnboost-cuda`); the
torch-ops route on devices without kernels (`meta` everywhere, a GPU without the CUDA
build where there is a GPU); the error the CPU-only extension gives for CUDA arrays."""

import importlib.util

import pytest
import torch

import cnnboost
from cnnboost import _core, reference
from harness import compare, twins

HAS_CUDA_BUILD = importlib.util.find_spec("cnnboost_cuda") is not None
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_CUDA_BUILD),
                               reason="needs a GPU and the CUDA build (cnnboost-cuda)")

CASES = {
    "ffc": (cnnboost.FFC, reference.FFC, (12, 5), {}, lambda d: [torch.randn(6, 12, 3, 3, **d, requires_grad=True)]),
    "ffc-vote": (cnnboost.FFC, reference.FFC, (12, 5), {}, lambda d: [torch.randn(6, 12, **d, requires_grad=True)]),
    "ssm": (cnnboost.SSM, reference.SSM, (12, 5), {}, lambda d: [torch.randn(6, 12, 2, 2, **d, requires_grad=True)]),
    "ab": (cnnboost.AB, reference.AB, (8,), {}, lambda d: [torch.randn(4, 8, 5, 5, **d, requires_grad=True)]),
    "ab-plus": (cnnboost.AB, reference.AB, (8,), {"groups": 1}, lambda d: [torch.randn(4, 8, 5, 5, **d, requires_grad=True)]),
    "afi": (cnnboost.AFI, reference.AFI, (8,), {},
            lambda d: [[torch.randn(3, 8, 4, 4, **d, requires_grad=True) for _ in range(3)]]),
}


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_matches_the_reference_on_cuda(name, train, dtype):
    fast_cls, ref_cls, args, kwargs, make = CASES[name]
    fast, ref = twins(fast_cls, ref_cls, *args, dtype=dtype, **kwargs)
    fast, ref = fast.cuda(), ref.cuda()
    compare(fast, ref, lambda: make({"dtype": dtype, "device": "cuda"}), train=train)


@pytest.mark.cuda
@needs_gpu
def test_cuda_results_stay_on_the_gpu_and_keep_running_stats():
    fast, ref = twins(cnnboost.AB, reference.AB, 8)
    fast, ref = fast.cuda(), ref.cuda()
    x = torch.randn(4, 8, 5, 5, device="cuda")
    out = fast(x)
    ref(x)
    assert out.device == x.device
    torch.testing.assert_close(fast.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(fast.bn.running_var, ref.bn.running_var)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.cuda
@needs_gpu
def test_cuda_host_memory_stays_bounded_over_many_steps():
    """Each CUDA argument is wrapped once per torch block and reused: before, every
    argument of every call left a few hundred bytes of host memory behind: 12-25 MB
    over these 3000 steps of 14 CUDA arguments each."""
    fast = cnnboost.AB(64).cuda()
    x = torch.randn(8, 64, 7, 7, device="cuda", requires_grad=True)
    step = lambda: fast(x).sum().backward()  # noqa: E731
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    before = _rss_bytes()
    for _ in range(3000):
        step()
    torch.cuda.synchronize()
    assert _rss_bytes() - before < 8 << 20


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_BUILD, reason="needs the CUDA build (cnnboost-cuda)")
def test_each_build_names_its_own_module():
    import cnnboost_cuda

    for name in ("FFC", "SSM", "AB", "AFI"):
        assert getattr(cnnboost_cuda, name).__module__ == "cnnboost_cuda"
        assert getattr(_core, name).__module__ == "cnnboost._core"


class FakeCudaArray:
    """Looks like a CUDA tensor to DLPack consumers, without a GPU."""

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):
        raise AssertionError("a CPU-only build must not try to read it")


@pytest.mark.skipif(HAS_CUDA_BUILD, reason="checks the CPU-only build")
def test_cpu_only_core_names_the_cuda_build_for_cuda_arrays():
    with pytest.raises(TypeError, match=r"x: expected an array in CPU memory.*cnnboost-cuda"):
        _core.AB(4).forward(FakeCudaArray(), None, None, None, None, None, None, True)


@pytest.fixture
def no_kernels_called(monkeypatch):
    """Fails a test that reaches either extension (`core_for` picks one per call)."""
    from cnnboost import _torch

    def refuse(t):
        raise AssertionError(f"a kernel was called for a tensor on {t.device}")

    for mod in (cnnboost.ab, cnnboost.afi, cnnboost.ffc, cnnboost.ssm):
        monkeypatch.setattr(mod, "core_for", refuse)
    return _torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_devices_without_kernels_compute_with_torch_ops(name, dtype, no_kernels_called):
    """`meta` tensors (shapes only) take torch's ops, like a GPU without the CUDA
    build; any floating dtype then works, as inside `cnnboost.torch_ops()`."""
    fast_cls, ref_cls, args, kwargs, make = CASES[name]
    d = {"dtype": dtype, "device": "meta"}
    fast = fast_cls(*args, **kwargs).to(**d)
    ref = ref_cls(*args, **kwargs).to(**d)
    inputs = make(d)
    out = fast(*inputs)
    assert out.device.type == "meta" and out.dtype == dtype
    assert out.shape == ref(*inputs).shape


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_without_the_cuda_build_matches_the_reference(name, train, monkeypatch, no_kernels_called):
    """A GPU without the CUDA build installed: torch's ops, the reference's numbers."""
    monkeypatch.setattr(no_kernels_called, "_cuda_build", [None])
    fast_cls, ref_cls, args, kwargs, make = CASES[name]
    fast, ref = twins(fast_cls, ref_cls, *args, dtype=torch.float64, **kwargs)
    fast, ref = fast.cuda(), ref.cuda()
    compare(fast, ref, lambda: make({"dtype": torch.float64, "device": "cuda"}), train=train)
