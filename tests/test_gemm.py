"""What computes the kernels' matrix products: torch's BLAS (the default where torch
exports one) or the built-in `gemm` crate. Every reference test runs on both (the
`each_backend` fixture); this file checks the choice itself."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch

import cnnboost
from cnnboost import _core, reference
from cnnboost._torch import torch_blas
from harness import compare, twins

HAS_TORCH_BLAS = torch_blas() is not None


@pytest.fixture
def restore_gemm():
    before = cnnboost.get_gemm()
    yield
    cnnboost.set_gemm(before)


@pytest.mark.skipif(not HAS_TORCH_BLAS, reason="this torch exports no sgemm_/dgemm_")
def test_torch_modules_use_torch_blas_by_default():
    code = "import cnnboost; a = cnnboost.get_gemm(); import cnnboost.ssm; print(a, cnnboost.get_gemm())"
    env = {k: v for k, v in os.environ.items() if k != "CNNBOOST_GEMM"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    # NumPy-only use (before any torch module) computes with the built-in GEMM.
    assert out.stdout.split() == ["builtin", "blas"]


def test_environment_variable_chooses_builtin():
    code = "import cnnboost, cnnboost.ffc; print(cnnboost.get_gemm())"
    env = dict(os.environ, CNNBOOST_GEMM="builtin")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "builtin"


def test_environment_variable_with_a_bad_name_says_so():
    code = "import cnnboost, cnnboost.ffc"
    env = dict(os.environ, CNNBOOST_GEMM="mkl")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "name: expected 'blas' or 'builtin', got 'mkl'" in out.stderr


@pytest.mark.usefixtures("restore_gemm")
def test_set_gemm_switches_and_rejects_unknown_names():
    cnnboost.set_gemm("builtin")
    assert cnnboost.get_gemm() == "builtin"
    if HAS_TORCH_BLAS:
        cnnboost.set_gemm("blas")
        assert cnnboost.get_gemm() == "blas"
    with pytest.raises(ValueError, match="name: expected 'blas' or 'builtin', got 'openblas'"):
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
    with pytest.raises(RuntimeError, match="cannot be used: sgemm_: .*differs from the built-in GEMM"):
        _core._set_blas(addr, addr)
    assert cnnboost.get_gemm() == "builtin", "nothing was registered"


def test_set_blas_needs_both_functions():
    with pytest.raises(RuntimeError, match="needs both sgemm_ and dgemm_"):
        _core._set_blas(0, 12345)


@pytest.mark.skipif(not HAS_TORCH_BLAS, reason="this torch exports no sgemm_/dgemm_")
@pytest.mark.usefixtures("restore_gemm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_gemms_give_the_reference_on_a_large_head(dtype):
    """Products big enough that both GEMMs block and thread them (the reference tests
    use small shapes)."""
    results = {}
    for gemm in ["blas", "builtin"]:
        cnnboost.set_gemm(gemm)
        torch.manual_seed(0)
        fast, ref = twins(cnnboost.SSM, reference.SSM, 384, 300, 3, dtype=dtype, seed=1)
        out, _ = compare(fast, ref, lambda: [torch.randn(64, 384, dtype=dtype, requires_grad=True)], train=True)
        results[gemm] = out.detach()
    torch.testing.assert_close(results["blas"], results["builtin"])
