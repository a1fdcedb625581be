"""Fuzz target over the `cnnboost._core` entry points.

Each input picks a module, a method, shapes (small, sometimes zero or mismatched),
dtypes, layouts and argument kinds (arrays, None, lists, wrong types) and calls the
kernel. The contract: the call returns, or raises TypeError/ValueError/OverflowError
— never any other exception, never a crash — and never writes to its inputs.

    python fuzz/fuzz_core.py -max_total_time=60      # with atheris (coverage-guided)
    python fuzz/fuzz_core.py --random 2000           # without atheris: random inputs

A crashing input found by atheris is saved by libFuzzer as crash-*; copy it into
fuzz/regressions/ and tests/test_fuzz.py replays it forever after.
"""

from __future__ import annotations

import sys

import numpy as np

from cnnboost import _core

ALLOWED = (TypeError, ValueError, OverflowError)


class Source:
    """Draws decisions from the fuzzer's bytes (zeros once they run out)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def pick(self, options):
        return options[self.byte() % len(options)]

    def size(self, small: int = 5) -> int:
        b = self.byte()
        return 0 if b == 255 else 1 + b % small


def array(src: Source, shape, dtype):
    """An array of `shape` in a drawn layout, or something that is not one."""
    kind = src.pick(["plain", "plain", "plain", "transposed", "sliced", "readonly", "wrong-dtype", "none", "list",
                     "scalar", "nan"])
    if kind == "none":
        return None
    if kind == "list":
        return [1.0, 2.0]
    if kind == "scalar":
        return np.float32(1.0)
    a = np.random.default_rng(src.byte()).standard_normal(shape).astype(dtype)
    if kind == "transposed" and a.ndim >= 2:
        a = np.ascontiguousarray(np.swapaxes(a, 0, 1)).swapaxes(0, 1)
    elif kind == "sliced" and a.ndim >= 1:
        a = np.repeat(a, 2, axis=-1)[..., ::2]
    elif kind == "readonly":
        a.flags.writeable = False
    elif kind == "wrong-dtype":
        a = a.astype(src.pick([np.int32, np.float16, np.complex64, np.float64 if dtype == np.float32 else np.float32]))
    elif kind == "nan" and a.size:
        a.flat[0] = np.nan
    return a


def maybe_off(src: Source, n: int) -> int:
    """`n`, or now and then a neighbour of it (a size mismatch)."""
    return src.pick([n, n, n, n, n + 1, max(n - 1, 0)])


def call_ffc(src: Source, dtype):
    nf, n, c, k = src.size(4), src.size(), src.size(6), src.size(4)
    core = _core.FFC(nf, src.pick(["paper", "plain", "bad"]), src.pick([1e-5, 0.0, float("nan")]))
    x = array(src, src.pick([(n, c), (n, c, src.size(3), src.size(3)), (n,)]), dtype)
    params = [array(src, (maybe_off(src, nf), c), dtype), array(src, (nf, maybe_off(src, c)), dtype),
              array(src, (maybe_off(src, k), c), dtype), array(src, (k,), dtype)]
    method = src.pick(["forward", "backward", "vote"])
    if method == "forward":
        return core.forward(x, *params, src.pick(["ensemble", "all", "x"]))
    if method == "vote":
        return core.vote(x, *params)
    g = array(src, (maybe_off(src, n), k), dtype)
    return core.backward(g, array(src, (n, c), dtype), *params, src.size(4), src.pick(["ensemble", "all"]))


def call_ssm(src: Source, dtype):
    g, per, n, k = src.size(3), src.size(3), src.size(), src.size(4)
    c = g * per
    core = _core.SSM(g, bool(src.byte() % 2), src.pick([1e-5, -1.0]))
    widths = [(i + 1) * per for i in range(g)]
    fcw = [array(src, (k, maybe_off(src, w)), dtype) for w in widths]
    fcb = [array(src, (k,), dtype) for _ in widths]
    nb = len(widths) - (0 if core.norm_last_head else 1)
    bns = [[array(src, (maybe_off(src, w),), dtype) for w in widths[:nb]] for _ in range(4)]
    x = array(src, src.pick([(n, c), (n, c, 2, 2), (n, c + 1)]), dtype)
    return core.forward(x, fcw, fcb, *bns, training=bool(src.byte() % 2))


def call_ab(src: Source, dtype):
    c = src.size(8)
    groups = src.pick([None, 1, c, 3])
    core = _core.AB(c, groups)
    cg = c // core.groups
    x = array(src, (src.size(), maybe_off(src, c), src.size(3), src.size(3)), dtype)
    w = array(src, src.pick([(c, cg, 1, 1), (c, cg), (c, cg + 1)]), dtype)
    stats = [array(src, (maybe_off(src, c),), dtype) for _ in range(4)]
    training = bool(src.byte() % 2)
    out = core.forward(x, w, src.pick([None, array(src, (c,), dtype)]), *stats, training)
    if src.byte() % 2:
        _, pooled, mean, invstd, _ = out
        core.backward(array(src, np.shape(x), dtype), x, pooled, mean, invstd, w, None, stats[0], stats[1], training)
    return out


def call_afi(src: Source, dtype):
    c, r = src.size(8), src.size(4)
    core = _core.AFI(c, r)
    shape = (src.size(), c, src.size(3), src.size(3))
    xs = [array(src, src.pick([shape, shape, shape, (1,) + shape[1:]]), dtype) for _ in range(src.size(3) - 1)]
    w1 = array(src, (core.hidden, maybe_off(src, c)), dtype)
    w2 = array(src, (c, core.hidden), dtype)
    out = core.forward(src.pick([xs, tuple(xs), xs[:1], "xs"]), w1, None, w2, src.pick([None, array(src, (c,), dtype)]))
    if src.byte() % 2:
        r_, z, h, wts = out
        core.backward(array(src, shape, dtype), xs, z, h, wts, w1, None, w2, None)
    return out


CALLS = [call_ffc, call_ssm, call_ab, call_afi]


def TestOneInput(data: bytes) -> None:
    src = Source(data)
    call = src.pick(CALLS)
    dtype = src.pick([np.float32, np.float64])
    try:
        call(src, dtype)
    except ALLOWED:
        pass


def main(argv):
    if len(argv) > 2 and argv[1] == "--random":
        rng = np.random.default_rng(0)
        for _ in range(int(argv[2])):
            TestOneInput(rng.bytes(int(rng.integers(1, 128))))
        print(f"{argv[2]} random inputs: no crash, no unexpected exception")
        return
    import atheris

    atheris.instrument_all()
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
