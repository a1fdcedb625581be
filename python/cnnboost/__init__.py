"""cnnboost: fast forward and backward kernels for four accuracy-booster modules
for convolutional networks, as drop-in ``torch.nn.Module``s.

* ``cnnboost.FFC`` — Sequential Feature Filtering Classifier (a classifier head)
* ``cnnboost.AB`` — Accuracy Booster block (channel recalibration)
* ``cnnboost.AFI`` — Attentive Feature Integration (fuses several feature maps)
* ``cnnboost.SSM`` — Split-and-Share Module (a classifier head)

Each module has a pure-torch twin in ``cnnboost.reference`` that computes the same
thing the slow way (the tests compare against it). Inside ``with
cnnboost.torch_ops():`` the modules compute that way themselves (for double
backward, or ``torch.export`` to a runtime without Python); ``torch.jit.trace``,
``torch.onnx.export`` and ``torch.func`` transforms get it automatically.
``cnnboost._core`` holds the Rust kernels for NumPy arrays and needs no torch.

Threads: the kernels run on as many threads as torch's intra-op pool
(``torch.get_num_threads()``, followed after ``torch.set_num_threads``) so that the
two do not oversubscribe the machine; ``cnnboost.set_num_threads(n)`` overrides it.
As in torch's OpenMP regions the calling thread works too, as the first of its own
pool's threads; that pool keeps the count of the thread's first call, so set the
count before it (after a change, the thread's calls wait on a shared pool instead:
the same values, slower on short calls; README, "Threads").

Backends: CPU calls run the rayon kernels. ``cnnboost.set_backend("candle")`` (or
``CNNBOOST_BACKEND=candle``) runs them through the device-generic candle code instead,
on candle's CPU device: the same code the CUDA build runs, slower, for checking it.

Matrix products (SSM and FFC are mostly GEMM): OpenBLAS (the scipy-openblas32
wheel), one thread per call, each large product split across cnnboost's threads; on
Intel CPUs, once a torch module is imported, the BLAS torch ships (MKL); the
built-in ``gemm`` crate where neither is there. ``cnnboost.set_gemm(name)`` (or
``CNNBOOST_GEMM``) chooses ``"openblas"``, ``"torch"`` or ``"builtin"``;
``cnnboost.get_gemm()`` says which is in use.

OpenMP: after each parallel op, torch's OpenMP threads busy-wait for the next one
(milliseconds), taking the cores from cnnboost's threads. With
``OMP_WAIT_POLICY=PASSIVE`` they sleep instead; a cnnboost training step is then up
to 1.5x faster. ``import cnnboost`` sets it (unless already set) when torch is not
yet imported; otherwise export it before starting Python.
"""

from __future__ import annotations

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _core, _gemm
from ._core import get_backend, get_num_threads, set_backend

if _os.environ.get("CNNBOOST_BACKEND"):
    set_backend(_os.environ["CNNBOOST_BACKEND"])

_threads_chosen = False


def set_num_threads(num_threads: int) -> None:
    """Sets the number of threads the kernels use. Until this is called, they use
    ``torch.get_num_threads()`` once a torch module of cnnboost is imported (the
    number of CPUs before that), following ``torch.set_num_threads`` at the next call.
    Best called before a thread's first kernel call: each calling thread runs its
    calls in a pool of its own of the count at that first call, and after a change
    waits on a shared pool of the new count instead (the same values)."""
    global _threads_chosen
    _core.set_num_threads(num_threads)
    _threads_chosen = True


def set_gemm(name: str) -> None:
    """Chooses what computes the kernels' matrix products: ``"openblas"`` (the
    scipy-openblas32 wheel, each large product split across cnnboost's threads),
    ``"torch"`` (the BLAS torch ships, MKL in its x86 wheels, on torch's threads;
    needs torch) or ``"builtin"`` (the ``gemm`` crate). The choice sticks: importing
    torch modules later does not change it."""
    _gemm.use(name)


def get_gemm() -> str:
    """What computes the kernels' matrix products: ``"openblas"``, ``"torch"`` or
    ``"builtin"`` (see :func:`set_gemm`)."""
    return _gemm.current()


_gemm.choose_default(torch_loaded=False)


__version__ = _core.__version__

# The torch modules import torch; load them on first use so that a NumPy-only user
# can `import cnnboost` and call `cnnboost._core` without torch installed.
_TORCH_MODULES = {"AB": "ab", "AFI": "afi", "FFC": "ffc", "SSM": "ssm", "reference": None, "models": None,
                  "convert_sync_batchnorm": "distributed", "torch_ops": "_torch"}

__all__ = ["AB", "AFI", "FFC", "SSM", "reference", "models", "convert_sync_batchnorm", "torch_ops", "get_backend",
           "get_gemm", "get_num_threads", "set_backend", "set_gemm", "set_num_threads", "__version__"]


def __getattr__(name: str):
    if name in _TORCH_MODULES:
        import importlib

        sub = _TORCH_MODULES[name]
        if sub is None:
            return importlib.import_module(f".{name}", __name__)
        return getattr(importlib.import_module(f".{sub}", __name__), name)
    raise AttributeError(f"module 'cnnboost' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_TORCH_MODULES))
