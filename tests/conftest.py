import os

import pytest
import torch
from hypothesis import settings

# CI draws the same examples every run (a failure there is reproducible); local runs
# draw new ones each time.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(params=["rayon", "candle"])
def each_backend(request):
    """Runs a test once on the rayon kernels and once on the candle implementation
    (on candle's CPU device: the code CUDA runs), then restores the default."""
    import cnnboost

    cnnboost.set_backend(request.param)
    yield request.param
    cnnboost.set_backend("rayon")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
