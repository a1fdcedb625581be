"""cnnboost against its pure-torch reference, eager and under torch.compile, in one
process: each case times the three side by side, interleaved, and reports medians
and ratios (>1 means cnnboost is faster), plus the achieved GFLOP/s or GB/s against
this machine's measured GEMM rate and copy bandwidth (the roofline). A memory-bound
case's GB/s counts the least traffic its math allows (every input read once, every
output written once), so 100% of copy is the floor no implementation can pass. A
GEMM-bound case (FFC, SSM) also times its matrix products alone, in torch (on
torch's BLAS, as eager runs them), interleaved with the rest: "products" is that
time, "ceiling" eager's time over it, the most an implementation computing those
products on torch's BLAS can gain (cnnboost's default GEMM may be faster: README,
"Matrix products"). A memory-bound case times torch's 64 MiB copy in the same rounds,
and gives its GB/s as a share of that copy's (the copy rate in the header, measured
once, is for reference: the VM's memory speed drifts). It also reports how long
cnnboost's step spent inside the Rust kernels' calls ("kernels", timed around each
call in the same steps) and their GB/s: the rest of the step is Python, autograd and
torch around them.

    python benches/compare.py                 # every case
    python benches/compare.py --only ffc      # cases whose name starts with "ffc"
    python benches/compare.py --no-compile    # skip torch.compile (compiling takes minutes)
    python benches/compare.py --processes 3   # each case in 3 fresh processes: median ratio, range
    python benches/compare.py --device cuda   # on a GPU (with the CUDA build, if installed)

A case's speed can differ from one process to the next on a shared machine (a 3 ms
call measured 2.7 ms in some fresh processes and 4-5 ms in others, the same minute),
so ``--processes N`` runs each case in N fresh processes and reports the median of
their ratios, with the lowest and highest.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import cnnboost  # first: it sets OMP_WAIT_POLICY=PASSIVE before torch starts OpenMP
import torch
from torch import nn
from cnnboost import _torch as cb_torch, reference


@dataclass
class Case:
    name: str
    make: Callable[[type], nn.Module]  # module class -> instance
    fast: type
    ref: type
    inputs: Callable[[], Sequence[torch.Tensor]]
    train: bool
    flops: float = 0.0  # the GEMM work of one call, for the GFLOP/s column
    bytes: float = 0.0  # the unavoidable memory traffic of one call, for GB/s
    # builds a function running the call's matrix products alone (in torch)
    products: Optional[Callable[[], Callable[[], None]]] = None
    call: Callable = staticmethod(lambda m, xs: m(*xs))


def linear_products(n: int, k: int, widths: Sequence[int], train: bool, repeat: int = 1):
    """Builds a function running the products of classifiers ``[n, w] -> [n, k]`` (one
    per width, each ``repeat`` times) in the layouts the kernels use: the forward
    ``a @ W.t()``, and in training also ``dW = g.t() @ a`` and ``da = g @ W``."""
    def build():
        ops = [(torch.randn(n, w), torch.randn(k, w)) for w in widths]
        g = torch.randn(n, k)

        def run():
            for a, w in ops:
                for _ in range(repeat):
                    a @ w.t()
                if train:
                    g.t() @ a
                    g @ w
        return run
    return build


def ffc_cases() -> List[Case]:
    n, c, k = 256, 2048, 1000
    gemm = 2.0 * n * c * k
    make = lambda cls: cls(c, k)  # noqa: E731
    # The classifier's linearity: one product per filtered feature, not one per output.
    train_products = linear_products(n, k, [c], True)
    return [
        Case("ffc train 256x2048", make, cnnboost.FFC, reference.FFC,
             lambda: [torch.randn(n, c, requires_grad=True)], True, flops=3 * gemm, products=train_products),
        Case("ffc train 256x2048x7x7", make, cnnboost.FFC, reference.FFC,
             lambda: [torch.randn(n, c, 7, 7, requires_grad=True)], True, flops=3 * gemm,
             products=train_products),
        Case("ffc vote 256x2048", make, cnnboost.FFC, reference.FFC,
             lambda: [torch.randn(n, c)], False, flops=4 * gemm, products=linear_products(n, k, [c], False, 4)),
        Case("ffc eval-mean 256x2048", lambda cls: cls(c, k, eval_ensemble="mean"), cnnboost.FFC, reference.FFC,
             lambda: [torch.randn(n, c)], False, flops=gemm, products=linear_products(n, k, [c], False)),
    ]


def ab_cases() -> List[Case]:
    cases = []
    for n, c, h, groups, label in [(32, 256, 56, None, "ab"), (32, 2048, 7, None, "ab"), (32, 512, 28, 1, "ab-plus")]:
        size = n * c * h * h * 4
        make = (lambda c, g: lambda cls: cls(c, groups=g))(c, groups)
        shape = (n, c, h, h)
        for train in (True, False):
            cases.append(Case(
                f"{label} {'train' if train else 'eval'} {n}x{c}x{h}x{h}", make, cnnboost.AB, reference.AB,
                (lambda s, t: lambda: [torch.randn(s, requires_grad=t)])(shape, train), train,
                # the least memory traffic the math allows: forward reads x and writes
                # out; backward reads grad and x and writes grad_x
                bytes=(5 if train else 2) * size,
            ))
    # torch's channels_last memory format, which torch recommends for CNNs on CPUs
    n, c, h = 32, 256, 56
    size = n * c * h * h * 4
    for train in (True, False):
        cases.append(Case(
            f"ab {'train' if train else 'eval'} {n}x{c}x{h}x{h} channels_last", lambda cls: cls(c), cnnboost.AB,
            reference.AB,
            (lambda t: lambda: [torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
                                .requires_grad_(t)])(train),
            train, bytes=(5 if train else 2) * size,
        ))
    return cases


def ssm_cases() -> List[Case]:
    n, c, k, g = 256, 2048, 1000, 4
    width = c * (g + 1) // 2  # Σ_i i·C/G: the concatenated width of the G heads
    gemm = 2.0 * n * width * k
    make = lambda cls: cls(c, k)  # noqa: E731
    widths = [(i + 1) * c // g for i in range(g)]
    return [
        Case("ssm train 256x2048", make, cnnboost.SSM, reference.SSM,
             lambda: [torch.randn(n, c, requires_grad=True)], True, flops=3 * gemm,
             products=linear_products(n, k, widths, True)),
        Case("ssm eval 256x2048", make, cnnboost.SSM, reference.SSM, lambda: [torch.randn(n, c)], False, flops=gemm,
             products=linear_products(n, k, widths, False)),
    ]


def afi_cases() -> List[Case]:
    cases = []
    for n, c, h in [(32, 64, 56), (32, 256, 28)]:
        m = 3
        size = n * c * h * h * 4
        for train in (True, False):
            cases.append(Case(
                f"afi {'train' if train else 'eval'} 3x{n}x{c}x{h}x{h}", (lambda c: lambda cls: cls(c))(c),
                cnnboost.AFI, reference.AFI,
                (lambda s, t: lambda: [[torch.randn(s, requires_grad=t) for _ in range(m)]])((n, c, h, h), train),
                train,
                # the least memory traffic the math allows: forward reads each map and
                # writes R; backward reads grad_R and each map and writes each gradient
                bytes=((m + 1) + (2 * m + 1)) * size if train else (m + 1) * size,
            ))
    # torch's channels_last memory format (AFI fuses the maps of conv stages)
    n, c, h, m = 32, 64, 56, 3
    size = n * c * h * h * 4
    for train in (True, False):
        cases.append(Case(
            f"afi {'train' if train else 'eval'} 3x{n}x{c}x{h}x{h} channels_last", lambda cls: cls(c),
            cnnboost.AFI, reference.AFI,
            (lambda t: lambda: [[torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
                                 .requires_grad_(t) for _ in range(m)]])(train),
            train, bytes=((m + 1) + (2 * m + 1)) * size if train else (m + 1) * size,
        ))
    return cases


NAME_WIDTH = 37  # the longest case name

CASE_GROUPS = {"ffc": ffc_cases, "ssm": ssm_cases, "ab": ab_cases, "afi": afi_cases}


# Where the cases run. Their tensors and modules are made inside `with torch.device(DEVICE)`
# and timed outside it: `torch.set_default_device` would keep a TorchFunctionMode active
# during the timings, and that adds ~2 us to every torch call made from Python, which
# a module calling more torch functions (the eager reference) pays more of.
DEVICE = torch.device("cpu")


COPY_BYTES = 64 * 1024 * 1024  # the roofline's copy: 64 MiB read, 64 MiB written


def copy_fn():
    """A function copying ``COPY_BYTES`` with torch: the memory roofline's yardstick."""
    with torch.device(DEVICE):
        x = torch.randn(COPY_BYTES // 4)
        y = torch.empty_like(x)
    return lambda: y.copy_(x)


def machine_rates():
    """(GEMM GFLOP/s, copy GB/s) as torch measures them here."""
    with torch.device(DEVICE):
        a, b = torch.randn(256, 2048), torch.randn(2048, 1000)
    t = median_time(lambda: a @ b, 15)
    gflops = 2 * 256 * 2048 * 1000 / t / 1e9
    t = median_time(copy_fn(), 15)
    gbs = 2 * COPY_BYTES / t / 1e9
    return gflops, gbs


def _sync():
    """Waits for queued GPU work (a no-op on the CPU), so that a timing covers it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _tensors(xs):
    for x in xs:
        if isinstance(x, (list, tuple)):
            yield from x
        else:
            yield x


def step_fn(module: nn.Module, case: Case):
    xs = case.inputs()
    module.train(case.train)
    if case.train:
        params = [p for p in module.parameters()]
        # The output gradient is made once and reused: a fresh map-sized tensor from
        # torch's allocator costs page faults (~10 ms per 25 MB on this VM) that belong
        # to neither module, and would dilute every ratio.
        grad = []

        def run():
            for p in params:
                p.grad = None
            for x in _tensors(xs):
                if x.requires_grad:
                    x.grad = None
            out = case.call(module, xs)
            if not grad:
                grad.append(torch.ones_like(out))
            out.backward(grad[0])
    else:
        def run():
            with torch.no_grad():
                case.call(module, xs)
    return run


class KernelClock:
    """The time cnnboost's steps spend inside the Rust kernels' calls, while in a
    ``with`` block: every kernel object a module makes (its ``_kernels`` factory) is
    handed out wrapped, its methods timed. What a step takes beyond it is Python,
    autograd and torch around the kernels. A wrapped call costs ~1 us more than a
    plain one. The factories are restored on leaving the block."""

    MODULES = ("ab", "afi", "ffc", "ssm")

    def __enter__(self):
        self.total = 0.0
        self._factories = []
        for name in self.MODULES:
            mod = importlib.import_module(f"cnnboost.{name}")
            make = mod._kernels
            self._factories.append((mod, make))
            mod._kernels = lambda *args, _make=make: _Timed(_make(*args), self)
        return self

    def __exit__(self, *exc):
        for mod, make in self._factories:
            mod._kernels = make


class _Timed:
    def __init__(self, kernels, clock: KernelClock):
        self._kernels, self._clock = kernels, clock

    def __getattr__(self, name):
        method = getattr(self._kernels, name)
        if not callable(method):
            return method

        def timed(*args):
            t0 = time.perf_counter()
            try:
                return method(*args)
            finally:
                self._clock.total += time.perf_counter() - t0
        return timed


def bench_case(case: Case, reps: int, compile_: bool):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        fast = case.make(case.fast)
        ref = case.make(case.ref)
        ref.load_state_dict(fast.state_dict())
        runs = {"cnnboost": step_fn(fast, case), "eager": step_fn(ref, case)}
        if compile_:
            torch._dynamo.reset()
            runs["compile"] = step_fn(torch.compile(ref), case)
        if case.products is not None:
            runs["products"] = case.products()
        if case.bytes:
            # The copy roofline, timed in the same rounds: the VM's memory speed moves
            # from minute to minute (27-40 GB/s in one morning), so a share of copy
            # measured once at the start drifts with it.
            runs["copy"] = copy_fn()
    for fn in runs.values():  # warm up (and compile)
        fn()
        fn()
    keys = list(runs)
    times = {k: [] for k in keys + ["kernels"]}
    shuffle = random.Random(0).shuffle
    with KernelClock() as clock:
        for _ in range(reps):
            # Interleaved, so that drift hits all alike, in a new order every round, so
            # that going first, or after a given neighbour, does too: on a GPU, the
            # first call of a fixed order measured 50-170 us slower (docs/performance.md,
            # "GPU"); on the CPU, the copy leaves 64 MiB of dirty cache lines for the
            # next run to write back (a rotating order put cnnboost after it in three
            # rounds of four).
            shuffle(keys)
            for k in keys:
                _sync()
                in_kernels = clock.total
                t0 = time.perf_counter()
                runs[k]()
                _sync()
                times[k].append(time.perf_counter() - t0)
                if k == "cnnboost":
                    times["kernels"].append(clock.total - in_kernels)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the cases whose name starts with this")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda (needs the CUDA build, cnnboost-cuda: README, 'CUDA')")
    parser.add_argument("--no-cuda-build", action="store_true",
                        help="on cuda, time the route a GPU without the CUDA build takes (torch's ops)")
    parser.add_argument("--gemm", choices=["openblas", "torch", "builtin"],
                        help="what computes cnnboost's CPU products (default: cnnboost's choice, README 'Matrix products')")
    parser.add_argument("--processes", type=int, default=1,
                        help="run each case in this many fresh processes; report the median ratio and its range")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case by name, times as JSON
    args = parser.parse_args(argv)
    if args.gemm:
        cnnboost.set_gemm(args.gemm)
    if args.no_cuda_build:
        cb_torch._cuda_build[:] = [None]
    global DEVICE
    DEVICE = torch.device(args.device)
    all_cases = [c for group in CASE_GROUPS.values() for c in group()]
    if args.case:
        (case,) = [c for c in all_cases if c.name == args.case]
        print(json.dumps(bench_case(case, args.reps, not args.no_compile)))
        return
    cases = [c for c in all_cases if c.name.startswith(args.only)]
    gflops, gbs = machine_rates()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    runs = f"medians of {args.reps}" + (f", in each of {args.processes} processes" if args.processes > 1 else "")
    if args.device.startswith("cuda"):
        where += ", cnnboost: " + ("torch's ops" if cb_torch._cuda_core() is None else "the CUDA build")
    print(f"torch {torch.__version__}, {args.device}: {where}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, cnnboost GEMM: {cnnboost.get_gemm()}; "
          f"roofline: torch GEMM {gflops:.0f} GFLOP/s, copy {gbs:.1f} GB/s; {runs}")
    w = 21 if args.processes > 1 else 9  # a ratio with its range: "1.12x (1.06-1.28)"
    head = f"{'case':<{NAME_WIDTH}} {'cnnboost':>9} {'eager':>9} {'compile':>9} {'vs eager':>{w}} {'vs comp.':>{w}}  achieved"
    print(head)
    print("-" * len(head))
    for case in cases:
        if args.processes > 1:
            print_row(case, [child_times(case, args) for _ in range(args.processes)], gflops, gbs)
        else:
            print_row(case, [bench_case(case, args.reps, not args.no_compile)], gflops, gbs)


def child_times(case: Case, args) -> dict:
    """The case's times measured in a fresh process (this script with ``--case``)."""
    cmd = [sys.executable, __file__, "--case", case.name, "--reps", str(args.reps), "--device", args.device]
    cmd += ["--no-compile"] if args.no_compile else []
    cmd += ["--gemm", args.gemm] if args.gemm else []
    cmd += ["--no-cuda-build"] if args.no_cuda_build else []
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_row(case: Case, times: List[dict], gflops: float, gbs: float):
    """One table row from one or more processes' times: median times and ratios, and
    the ratios' range when there are several."""
    med = lambda xs: statistics.median(xs)  # noqa: E731
    fast = med([t["cnnboost"] for t in times])
    eager = med([t["eager"] for t in times])
    comp = med([t["compile"] for t in times]) if "compile" in times[0] else None

    def ratio(key):
        if key not in times[0]:
            return f"{float('nan'):>8.2f}x" + " " * (12 if len(times) > 1 else 0)
        rs = [t[key] / t["cnnboost"] for t in times]
        spread = f" ({min(rs):.2f}-{max(rs):.2f})" if len(rs) > 1 else ""
        return f"{med(rs):>8.2f}x{spread}"

    ach = ""
    if case.flops:
        ach = f"{case.flops / fast / 1e9:.0f} GFLOP/s ({100 * case.flops / fast / 1e9 / gflops:.0f}% of GEMM)"
        if "products" in times[0]:
            prod = med([t["products"] for t in times])
            ach += f"; products {prod * 1e3:.1f}ms, ceiling {eager / prod:.2f}x"
    elif case.bytes:
        # Shares of the copy rate timed alongside, in each process, then their median.
        def share(key):
            return med([case.bytes * t["copy"] / (2 * COPY_BYTES * t[key]) for t in times])
        copy = med([2 * COPY_BYTES / t["copy"] for t in times]) / 1e9
        ach = f"{case.bytes / fast / 1e9:.1f} GB/s ({100 * share('cnnboost'):.0f}% of copy at {copy:.1f} GB/s)"
        if times[0].get("kernels"):
            kern = med([t["kernels"] for t in times])
            ach += f"; kernels {kern * 1e3:.2f}ms, {case.bytes / kern / 1e9:.1f} GB/s ({100 * share('kernels'):.0f}%)"
    print(f"{case.name:<{NAME_WIDTH}} {fast * 1e3:>7.2f}ms {eager * 1e3:>7.2f}ms "
          f"{(comp * 1e3 if comp else float('nan')):>7.2f}ms {ratio('eager')} {ratio('compile')}  {ach}", flush=True)


if __name__ == "__main__":
    main()
