import os

import pytest
import torch
from hypothesis import settings

# CI draws the same examples every run (a failure there is reproducible); local runs
# draw new ones each time.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _kernels_in_the_pool():
    """Every kernel call in cnnboost's thread pool, as large calls run: the tests' small
    shapes would otherwise run on the calling thread (``_set_serial_work``), and the
    pool's route (threads, the GIL released, fork) would go untested.
    ``each_backend``'s "rayon/calling-thread" takes the small calls' route."""
    from cnnboost import _core

    before = _core._set_serial_work(0)
    yield
    _core._set_serial_work(before)
    _core._set_own_pools(True)


@pytest.fixture(params=["rayon", "rayon/builtin-gemm", "rayon/calling-thread", "candle"])
def each_backend(request, _kernels_in_the_pool):
    """Runs a test on the rayon kernels (their products on the default GEMM:
    OpenBLAS, or torch's MKL on Intel; tests/test_gemm.py runs each one on large
    products) in cnnboost's pool, on them with the built-in GEMM (the `gemm` crate),
    on them run on the calling thread (where small calls run), and on the candle
    implementation (on candle's CPU device: the code CUDA runs); then restores the
    defaults."""
    import cnnboost
    from cnnboost import _core

    backend, _, variant = request.param.partition("/")
    before = cnnboost.get_gemm()
    cnnboost.set_backend(backend)
    if variant == "builtin-gemm":
        cnnboost.set_gemm("builtin")
    if variant == "calling-thread":
        _core._set_serial_work(1 << 62)
    yield request.param
    cnnboost.set_backend("rayon")
    cnnboost.set_gemm(before)
    _core._set_serial_work(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
