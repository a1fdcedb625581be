"""Type stubs for the Rust extension ``cnnboost._core``.

Every array argument is a NumPy array or any object with ``__dlpack__`` (a torch
CPU tensor, …), float32 or float64, all of one dtype; it is read in place (only a
layout that is not C-contiguous and aligned is copied first). Results are new NumPy
arrays. Bad arguments raise ``ValueError``/``TypeError`` naming the argument.

The CUDA build, module ``cnnboost_cuda`` (distribution ``cnnboost-cuda``), has the
same classes and functions: given CUDA tensors (contiguous, one dtype, one device) it
reads them in place and returns DLPack capsules (``torch.from_dlpack`` takes them
without a copy) in place of NumPy arrays.
"""

from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import NDArray

ArrayLike = Any  # np.ndarray | object with __dlpack__
Array = NDArray[np.floating]
ArrayList = Union[List[ArrayLike], Tuple[ArrayLike, ...]]  # a list or tuple, one array per head

__version__: str

def set_num_threads(num_threads: int) -> None:
    """Sets the number of threads the kernels use (default: the number of CPUs)."""

def get_num_threads() -> int:
    """The number of threads the kernels use."""

def set_backend(name: str) -> None:
    """``"rayon"`` (default: the fast CPU kernels) or ``"candle"`` (the device-generic
    candle implementation on candle's CPU device, the code the CUDA build runs;
    slower, for checking it)."""

def get_backend() -> str:
    """The backend of CPU calls: ``"rayon"`` or ``"candle"``."""

def get_gemm() -> str:
    """What computes the kernels' matrix products: ``"blas"`` (a registered BLAS;
    ``cnnboost.get_gemm()`` says which) or ``"builtin"`` (the ``gemm`` crate)."""

def update_running_stats(
    running_means: Sequence[Array],
    running_vars: Sequence[Array],
    counts: Sequence[Array],
    means: Sequence[Array],
    variances: Sequence[Array],
    momentum: float | None,
) -> None:
    """What torch's BatchNorm does to its buffers in a training step, in place, for
    each batch norm ``i``: ``counts[i] += 1`` (an int64 ``num_batches_tracked``), then
    ``running = running · (1 − f) + batch · f`` for ``running_means[i]``/``means[i]``
    and ``running_vars[i]``/``variances[i]``, with ``f`` the ``momentum``, or
    ``1 / counts[i]`` when it is None; rounded as torch's ops round. Every argument is
    checked before anything is written."""

def expand_planes(values: ArrayLike, hw: int, channels_last: bool = False) -> Array:
    """``values`` (shape ``S``) with each value repeated ``hw`` times: a new array of
    shape ``S + (hw,)``, the gradient of a global average pooling (``values`` already
    divided by ``hw``) written out; with ``channels_last``, ``values`` ``[N, C]`` as
    the rows of a new ``[N, hw, C]`` array."""

def _set_serial_work(work: int) -> int:
    """Sets the size of call (its maps' elements plus its products' multiply-adds / 256)
    below which a kernel runs on the calling thread alone instead of across cnnboost's
    threads (default 65536; 0: always across them); returns the previous value. For
    tests and benchmarks."""

def _set_own_pools(on: bool) -> bool:
    """Sets whether a calling thread runs the kernels in a pool of its own, as that
    pool's first worker (the default), or hands them to the shared pool and waits (the
    route its calls take after ``set_num_threads`` to another count, or in a forked
    child); returns the previous value. For tests and benchmarks."""

def _set_blas(sgemm: int, dgemm: int, serial: bool = False) -> None:
    """Registers a BLAS's ``sgemm_``/``dgemm_`` by address (``(0, 0)``: back to the
    built-in GEMM). ``serial``: the BLAS computes each call on its caller's thread
    (and may be called from several at once); the kernels then split each large
    product across their own threads. Checked by a small product; raises
    ``RuntimeError`` if it differs. An address that is not such a function crashes
    the process: use ``cnnboost.set_gemm``."""

class FFC:
    """Sequential Feature Filtering Classifier kernels. Holds only the
    hyper-parameters; parameters are passed to each call: ``ln_weight``/``ln_bias``
    ``[L, C]`` (the L LayerNorms stacked), ``fc_weight`` ``[K, C]``, ``fc_bias`` ``[K]``.

    >>> core = FFC(num_filters=3, combine="paper")
    >>> out, pooled = core.forward(x, ln_w, ln_b, fc_w, fc_b)        # x: [N, C]
    >>> gx, g_ln_w, g_ln_b, g_fc_w, g_fc_b = core.backward(dout, x, ln_w, ln_b, fc_w, fc_b)
    """

    def __init__(self, num_filters: int = 3, combine: str = "paper", eps: float = 1e-5) -> None: ...
    @property
    def num_filters(self) -> int: ...
    @property
    def combine(self) -> str: ...
    @property
    def eps(self) -> float: ...
    @property
    def num_outputs(self) -> int:
        """J: 2L+1 for "paper", L+1 for "plain"."""
    def ensemble_coeffs(self) -> list[float]:
        """a_l with mean_j g_j = sum_l a_l f_l."""
    def forward(
        self,
        x: ArrayLike,
        ln_weight: ArrayLike,
        ln_bias: ArrayLike,
        fc_weight: ArrayLike,
        fc_bias: ArrayLike,
        outputs: str = "ensemble",
        channels_last: bool = False,
    ) -> Tuple[Array, Array]:
        """``x`` ``[N, C]`` or ``[N, C, H, W]`` (``[N, H, W, C]`` with
        ``channels_last=True``: a torch ``channels_last`` map in memory order). Returns ``(out, pooled)``: ``out``
        ``[N, K]`` ("ensemble": mean logits) or ``[J, N, K]`` ("all"); ``pooled`` the
        ``[N, C]`` plane means of a 4-d ``x`` (empty for a 2-d ``x``), for ``backward``."""
    def backward(
        self,
        grad_out: ArrayLike,
        pooled: ArrayLike,
        ln_weight: ArrayLike,
        ln_bias: ArrayLike,
        fc_weight: ArrayLike,
        fc_bias: ArrayLike,
        hw: int = 1,
        outputs: str = "ensemble",
    ) -> Tuple[Array, Array, Array, Array, Array]:
        """From the pooled ``[N, C]`` features (``x`` itself for a 2-d ``x``). Returns
        ``(grad_x, grad_ln_weight, grad_ln_bias, grad_fc_weight, grad_fc_bias)``;
        ``grad_x`` is ``[N, C]``: for a 4-d input with ``hw = H*W`` it
        is the gradient of every pixel of each plane (broadcast it over H×W)."""
    def vote(
        self,
        x: ArrayLike,
        ln_weight: ArrayLike,
        ln_bias: ArrayLike,
        fc_weight: ArrayLike,
        fc_bias: ArrayLike,
        channels_last: bool = False,
    ) -> Array:
        """``[N, K]`` scores whose row-wise argmax is the voted class (``x`` as in
        ``forward``)."""

class SSM:
    """Split-and-Share Module kernels. Holds only the hyper-parameters; parameters are
    passed to each call as lists, with ``n = C / num_heads``: one array per head
    (``fc_weights[h]`` ``[K, (h+1)·n]``, ``fc_biases[h]`` ``[K]``) and one per
    normalised head, the first ``normalised_heads`` (``bn_weights[h]``,
    ``bn_biases[h]``, ``running_means[h]``, ``running_vars[h]``, each ``[(h+1)·n]``).

    >>> core = SSM(num_heads=4)
    >>> out, mean, invstd, var, pooled = core.forward(x, fc_ws, fc_bs, bn_ws, bn_bs, rms, rvs)
    >>> gx, g_fc_ws, g_fc_bs, g_bn_ws, g_bn_bs = core.backward(dout, x, mean, invstd, fc_ws, fc_bs, bn_ws, bn_bs)
    """

    def __init__(self, num_heads: int = 4, norm_last_head: bool = False, eps: float = 1e-5) -> None: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def norm_last_head(self) -> bool: ...
    @property
    def eps(self) -> float: ...
    @property
    def normalised_heads(self) -> int:
        """H: heads with BN + ReLU, ``num_heads - 1`` (``num_heads`` with norm_last_head)."""
    def forward(
        self,
        x: ArrayLike,
        fc_weights: ArrayList,
        fc_biases: ArrayList,
        bn_weights: ArrayList,
        bn_biases: ArrayList,
        running_means: ArrayList,
        running_vars: ArrayList,
        training: bool = True,
        outputs: str = "ensemble",
        channels_last: bool = False,
    ) -> Tuple[Array, Array, Array, Array, Array]:
        """``x`` ``[N, C]`` or ``[N, C, H, W]`` (``[N, H, W, C]`` with
        ``channels_last=True``). Returns ``(out, mean, invstd, var,
        pooled)``: ``out`` ``[N, K]`` ("ensemble": the heads' mean logits) or
        ``[G, N, K]`` ("all"); ``mean``/``invstd`` what normalised each normalised head
        (batch statistics in training, running ones in eval), concatenated head after
        head (head ``h`` at ``n·h(h+1)/2 .. n·(h+1)(h+2)/2``); ``var`` the unbiased batch
        variance in that layout (training; empty in eval), for the caller's
        running-statistics update; ``pooled`` the ``[N, C]`` plane means of a 4-d ``x``
        (empty for a 2-d ``x``). The running statistics are read in eval only."""
    def backward(
        self,
        grad_out: ArrayLike,
        pooled: ArrayLike,
        mean: ArrayLike,
        invstd: ArrayLike,
        fc_weights: ArrayList,
        fc_biases: ArrayList,
        bn_weights: ArrayList,
        bn_biases: ArrayList,
        hw: int = 1,
        training: bool = True,
        outputs: str = "ensemble",
    ) -> Tuple[Array, List[Array], List[Array], List[Array], List[Array]]:
        """From the pooled ``[N, C]`` features (``x`` itself for a 2-d ``x``) and the
        forward's ``mean``/``invstd``. Returns ``(grad_x, grad_fc_weights,
        grad_fc_biases, grad_bn_weights, grad_bn_biases)``; ``grad_x`` is ``[N, C]``: for
        a 4-d input with ``hw = H*W`` it is the gradient of every pixel of each plane."""

class AB:
    """Accuracy Booster block kernels. Holds only the hyper-parameters; parameters
    and running statistics are passed to each call: ``conv_weight``
    ``[C, C/groups, 1, 1]`` (or ``[C, C/groups]``), ``conv_bias`` ``[C]`` or None,
    ``bn_weight``/``bn_bias``/``running_mean``/``running_var`` ``[C]``. Running
    statistics are only read (in eval); training returns the batch statistics.

    >>> core = AB(channels=64)                       # groups=None: depthwise (AB); 1: AB-Plus
    >>> out, pooled, mean, invstd, var = core.forward(x, w, None, g, b, rm, rv, True)
    >>> gx, gw, gb, gg, gbeta = core.backward(dout, x, pooled, mean, invstd, w, None, g, b, True)
    """

    def __init__(self, channels: int, groups: Optional[int] = None, eps: float = 1e-5) -> None: ...
    @property
    def channels(self) -> int: ...
    @property
    def groups(self) -> int: ...
    @property
    def eps(self) -> float: ...
    def forward(
        self,
        x: ArrayLike,
        conv_weight: ArrayLike,
        conv_bias: Optional[ArrayLike],
        bn_weight: ArrayLike,
        bn_bias: ArrayLike,
        running_mean: ArrayLike,
        running_var: ArrayLike,
        training: bool,
        channels_last: bool = False,
    ) -> Tuple[Array, Array, Array, Array, Array]:
        """``x`` ``[N, C, H, W]``, or ``[N, H, W, C]`` with ``channels_last=True`` (the
        memory order of a torch ``channels_last`` map). Returns ``(out, pooled, mean,
        invstd, var_unbiased)``: ``out`` like ``x``; ``pooled`` ``[N, C]`` and
        ``mean``/``invstd`` ``[C]`` for ``backward``; ``var_unbiased`` ``[C]`` in
        training, empty in eval."""
    def backward(
        self,
        grad_out: ArrayLike,
        x: ArrayLike,
        pooled: ArrayLike,
        mean: ArrayLike,
        invstd: ArrayLike,
        conv_weight: ArrayLike,
        conv_bias: Optional[ArrayLike],
        bn_weight: ArrayLike,
        bn_bias: ArrayLike,
        training: bool,
        channels_last: bool = False,
    ) -> Tuple[Array, Array, Array, Array, Array]:
        """``grad_out`` and ``x`` in the forward's layout. Returns ``(grad_x,
        grad_conv_weight [C, C/groups, 1, 1], grad_conv_bias ([C], empty without a
        bias), grad_bn_weight, grad_bn_bias)``."""

class AFI:
    """Attentive Feature Integration kernels: fuse M >= 1 same-shape maps (a list of
    ``[N, C, H, W]`` arrays, read in place) with a shared scorer ``fc1_weight``
    ``[C/r, C]``, ``fc2_weight`` ``[C, C/r]``, optional biases.

    >>> core = AFI(channels=64, reduction=4)
    >>> out, z, hidden, weights = core.forward([x1, x2, x3], w1, None, w2, None)
    >>> gxs, gw1, gb1, gw2, gb2 = core.backward(dout, [x1, x2, x3], z, hidden, weights, w1, None, w2, None)
    """

    def __init__(self, channels: int, reduction: int = 4) -> None: ...
    @property
    def channels(self) -> int: ...
    @property
    def hidden(self) -> int:
        """``channels // reduction``."""
    def forward(
        self,
        xs: Sequence[ArrayLike],
        fc1_weight: ArrayLike,
        fc1_bias: Optional[ArrayLike],
        fc2_weight: ArrayLike,
        fc2_bias: Optional[ArrayLike],
        channels_last: bool = False,
    ) -> Tuple[Array, Array, Array, Array]:
        """Maps ``[N, C, H, W]``, or ``[N, H, W, C]`` with ``channels_last=True``.
        Returns ``(out, z, hidden, weights)``: ``out`` like each map; ``z``
        ``[M, N, C]``, ``hidden`` ``[M, N, C/r]``, ``weights`` ``[M, N, C]`` (softmax
        over the maps) for ``backward``."""
    def backward(
        self,
        grad_out: ArrayLike,
        xs: Sequence[ArrayLike],
        z: ArrayLike,
        hidden: ArrayLike,
        weights: ArrayLike,
        fc1_weight: ArrayLike,
        fc1_bias: Optional[ArrayLike],
        fc2_weight: ArrayLike,
        fc2_bias: Optional[ArrayLike],
        channels_last: bool = False,
    ) -> Tuple[List[Array], Array, Array, Array, Array]:
        """``grad_out`` and ``xs`` in the forward's layout. Returns ``(grad_xs,
        grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias)``; a bias
        gradient is empty when that bias is None."""
