"""What computes the kernels' matrix products (FFC and SSM are mostly GEMM):

* ``"openblas"``: OpenBLAS from the ``scipy-openblas32`` wheel (the build NumPy and
  SciPy are made with), one thread per call; the kernels split each large product
  across their own threads, so no third pool of threads competes with torch's and
  cnnboost's for the cores;
* ``"torch"``: the BLAS torch ships and exports (MKL in torch's x86 wheels), on
  torch's OpenMP threads;
* ``"builtin"``: the ``gemm`` crate, always there.

The default (unless ``CNNBOOST_GEMM`` or :func:`cnnboost.set_gemm` says otherwise):
``"openblas"`` where its wheel is installed, except that on Intel CPUs, once a torch
module of cnnboost is imported, ``"torch"`` (MKL: the BLAS of the reference the
modules are compared with, which OpenBLAS was not measured against on Intel);
``"builtin"`` where neither is available. On this project's AMD EPYC CI host
OpenBLAS split across two threads ran SSM's training products 10-18% faster than
MKL on its own threads (docs/performance.md)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import warnings

from . import _core

NAMES = ("openblas", "torch", "builtin")

_current = "builtin"
_chosen_by_user = False
_openblas_fns: tuple[int, int] | None = None


def current() -> str:
    return _current


def openblas() -> tuple[int, int] | None:
    """The addresses of ``sgemm_``/``dgemm_`` of the scipy-openblas32 wheel's library,
    set to compute on the calling thread alone, or None where the wheel is missing."""
    global _openblas_fns
    if _openblas_fns is not None:
        return _openblas_fns
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    libdir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    names = sorted(n for n in os.listdir(libdir) if "scipy_openblas" in n
                   and n.endswith((".so", ".dylib", ".dll"))) if os.path.isdir(libdir) else []
    if not names:
        return None
    # OpenBLAS starts its thread pool when loaded, sized by this variable; it would
    # sit idle (each call runs on its caller), so it is kept to one thread.
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        lib = ctypes.CDLL(os.path.join(libdir, names[0]))
    except OSError:
        return None
    finally:
        if saved is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved
    try:
        lib.scipy_openblas_set_num_threads(1)
        fns = tuple(ctypes.cast(getattr(lib, f), ctypes.c_void_p).value for f in ("scipy_sgemm_", "scipy_dgemm_"))
    except AttributeError:
        return None
    _openblas_fns = fns  # type: ignore[assignment]
    return _openblas_fns


def torch_blas() -> tuple[int, int] | None:
    """The addresses of the ``sgemm_`` and ``dgemm_`` that torch's CPU library exports
    (MKL in torch's x86 Linux wheels), or None where it exports none."""
    import torch

    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(libdir, name)
        if not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)  # already loaded by torch: this only finds it
            return tuple(ctypes.cast(getattr(lib, f), ctypes.c_void_p).value for f in ("sgemm_", "dgemm_"))
        except (OSError, AttributeError):
            return None
    return None


def use(name: str, *, by_user: bool = True) -> None:
    """Makes ``name`` (one of :data:`NAMES`) compute the products; ValueError naming
    what is missing if it cannot."""
    global _current, _chosen_by_user
    if name == "builtin":
        _core._set_blas(0, 0)
    elif name == "openblas":
        fns = openblas()
        if fns is None:
            raise ValueError("name: 'openblas' needs the scipy-openblas32 package (pip install scipy-openblas32)")
        _core._set_blas(*fns, True)
    elif name == "torch":
        if importlib.util.find_spec("torch") is None:
            raise ValueError("name: 'torch' needs torch installed; use 'openblas' or 'builtin'")
        fns = torch_blas()
        if fns is None:
            raise ValueError("name: 'torch' needs the sgemm_/dgemm_ that torch's CPU library exports, and this "
                             "torch exports none; use 'openblas' or 'builtin'")
        _core._set_blas(*fns)
    else:
        options = ", ".join(repr(n) for n in NAMES)
        raise ValueError(f"name: expected one of {options}, got {name!r}")
    _current = name
    _chosen_by_user = _chosen_by_user or by_user


def intel_cpu() -> bool:
    """Whether this is an Intel CPU (where MKL is the BLAS to beat)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return "intel" in platform.processor().lower()


def choose_default(torch_loaded: bool) -> None:
    """Picks the default (see the module's docstring), unless the user chose;
    ``CNNBOOST_GEMM`` counts as the user's choice. A BLAS whose check product comes
    out wrong is skipped with a warning."""
    if _chosen_by_user:
        return
    env = os.environ.get("CNNBOOST_GEMM")
    if env:
        use(env)
        return
    order = ["openblas", "builtin"]
    if torch_loaded and intel_cpu():
        order.insert(0, "torch")
    for name in order:
        try:
            use(name, by_user=False)
            return
        except ValueError:
            continue
        except RuntimeError as e:  # its check product came out wrong
            warnings.warn(f"{e}; cnnboost does not use {name!r}", RuntimeWarning, stacklevel=3)
