import os

import pytest
import torch
from hypothesis import settings

# CI draws the same examples every run (a failure there is reproducible); local runs
# draw new ones each time.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(params=["rayon", "rayon/builtin-gemm", "candle"])
def each_backend(request):
    """Runs a test on the rayon kernels (their products on the default GEMM:
    OpenBLAS, or torch's MKL on Intel; tests/test_gemm.py runs each one on large
    products), on the rayon kernels with the built-in GEMM (the `gemm` crate), and on
    the candle implementation (on candle's CPU device: the code CUDA runs); then
    restores the defaults."""
    import cnnboost

    backend, _, gemm = request.param.partition("/")
    before = cnnboost.get_gemm()
    cnnboost.set_backend(backend)
    if gemm:
        cnnboost.set_gemm("builtin")
    yield request.param
    cnnboost.set_backend("rayon")
    cnnboost.set_gemm(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
