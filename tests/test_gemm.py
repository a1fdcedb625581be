"""What computes the kernels' matrix products: OpenBLAS (serial, each large product
split across cnnboost's threads), torch's BLAS, or the built-in `gemm` crate. Every
reference test runs on the default and on the built-in one (the `each_backend`
fixture); this file checks the choice itself, and each GEMM on products large
enough to be split and threaded."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch

import cnnboost
from cnnboost import _core, _gemm, reference
from harness import compare, twins

AVAILABLE = [name for name, fns in [("openblas", _gemm.openblas()), ("torch", _gemm.torch_blas()), ("builtin", True)]
             if fns is not None]


@pytest.fixture
def restore_gemm():
    before = cnnboost.get_gemm()
    yield
    cnnboost.set_gemm(before)
    cnnboost.set_num_threads(torch.get_num_threads())


def _run(code, **env):
    base = {k: v for k, v in os.environ.items() if k != "CNNBOOST_GEMM"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env})


def test_default_is_openblas_then_torch_on_intel():
    out = _run("import cnnboost; a = cnnboost.get_gemm(); import cnnboost.ssm; print(a, cnnboost.get_gemm())")
    assert out.returncode == 0, out.stderr
    first = "openblas" if "openblas" in AVAILABLE else "builtin"
    then = "torch" if _gemm.intel_cpu() and "torch" in AVAILABLE else first
    assert out.stdout.split() == [first, then]


@pytest.mark.parametrize("name", AVAILABLE)
def test_environment_variable_chooses(name):
    out = _run("import cnnboost, cnnboost.ffc; print(cnnboost.get_gemm(), cnnboost._core.get_gemm())",
               CNNBOOST_GEMM=name)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [name, "builtin" if name == "builtin" else "blas"]


def test_a_choice_made_before_the_torch_modules_sticks():
    out = _run("import cnnboost; cnnboost.set_gemm('builtin'); import cnnboost.ssm; print(cnnboost.get_gemm())")
    assert out.stdout.strip() == "builtin", out.stderr


def test_environment_variable_with_a_bad_name_says_so():
    out = _run("import cnnboost", CNNBOOST_GEMM="mkl")
    assert out.returncode != 0
    assert "name: expected one of 'openblas', 'torch', 'builtin', got 'mkl'" in out.stderr


@pytest.mark.usefixtures("restore_gemm")
def test_set_gemm_switches_and_rejects_unknown_names():
    for name in AVAILABLE:
        cnnboost.set_gemm(name)
        assert cnnboost.get_gemm() == name
        assert _core.get_gemm() == ("builtin" if name == "builtin" else "blas")
    with pytest.raises(ValueError, match="name: expected one of 'openblas', 'torch', 'builtin', got 'blas'"):
        cnnboost.set_gemm("blas")
    assert cnnboost.get_gemm() == AVAILABLE[-1], "a refused name changes nothing"


@pytest.mark.usefixtures("restore_gemm")
def test_openblas_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(_gemm, "_openblas_fns", None)
    monkeypatch.setattr(_gemm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install scipy-openblas32"):
        cnnboost.set_gemm("openblas")


# The Fortran ?gemm_ signature: 13 pointers and the two hidden string lengths.
GEMM_FN = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13), ctypes.c_size_t, ctypes.c_size_t)


@GEMM_FN
def _gemm_that_does_nothing(*args):
    """A "BLAS" whose products leave C as it was: wrong, but safe to call."""


@pytest.mark.usefixtures("restore_gemm")
def test_a_blas_that_computes_wrong_products_is_refused():
    cnnboost.set_gemm("builtin")
    addr = ctypes.cast(_gemm_that_does_nothing, ctypes.c_void_p).value
    for serial in (False, True):
        with pytest.raises(RuntimeError, match="cannot be used: sgemm_: .*differs from the built-in GEMM"):
            _core._set_blas(addr, addr, serial)
        assert _core.get_gemm() == "builtin", "nothing was registered"


def test_set_blas_needs_both_functions():
    with pytest.raises(RuntimeError, match="needs both sgemm_ and dgemm_"):
        _core._set_blas(0, 12345)


@pytest.mark.usefixtures("restore_gemm")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_gemm_gives_the_reference_on_large_heads(dtype, threads):
    """Products big enough that each GEMM blocks and threads them, and that OpenBLAS's
    are split across the kernels' threads (in uneven blocks with 3), for SSM (a
    product per head) and FFC (one product, and its transposes in the backward)."""
    cnnboost.set_num_threads(threads)
    results = {}
    for gemm in AVAILABLE:
        cnnboost.set_gemm(gemm)
        torch.manual_seed(0)
        fast, ref = twins(cnnboost.SSM, reference.SSM, 384, 300, 3, dtype=dtype, seed=1)
        out, _ = compare(fast, ref, lambda: [torch.randn(64, 384, dtype=dtype, requires_grad=True)], train=True)
        fast, ref = twins(cnnboost.FFC, reference.FFC, 320, 250, dtype=dtype, seed=2, eval_ensemble="mean")
        out2, _ = compare(fast, ref, lambda: [torch.randn(96, 320, dtype=dtype, requires_grad=True)], train=True)
        results[gemm] = (out.detach(), out2.detach())
    for gemm in AVAILABLE[1:]:
        torch.testing.assert_close(results[gemm], results[AVAILABLE[0]])
