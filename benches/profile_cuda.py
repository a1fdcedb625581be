"""Where a `compare.py` case's GPU time goes: torch.profiler (CUPTI) over a few steps
of cnnboost and of the eager reference, each GPU kernel's total time, largest first.
candle's kernels are launched outside torch's dispatcher but in the same process, so
they are listed too.

    python benches/profile_cuda.py "ab eval 32x256x56x56" "ffc train 256x2048"
"""

from __future__ import annotations

import argparse

import cnnboost  # noqa: F401  (first, as in compare.py)
import torch
from torch.profiler import ProfilerActivity, profile

import compare


def profile_case(case: compare.Case, steps: int, rows: int):
    torch.manual_seed(0)
    for label, cls in (("cnnboost", case.fast), ("eager", case.ref)):
        with torch.device(compare.DEVICE):
            run = compare.step_fn(case.make(cls), case)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                run()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.device_time_total for e in kernels) / steps
        print(f"\n{case.name} / {label}: {total / 1e3:.3f} ms of GPU kernels per step, "
              f"{sum(e.count for e in kernels) / steps:.0f} launches")
        for e in sorted(kernels, key=lambda e: -e.device_time_total)[:rows]:
            print(f"  {e.device_time_total / steps / 1e3:8.3f} ms  {e.count // steps:4d}x  {e.key[:90]}")
        if not kernels:  # an older profiler that files kernels differently: its own table
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", help="compare.py case names")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    compare.DEVICE = torch.device("cuda")
    cases = {c.name: c for group in compare.CASE_GROUPS.values() for c in group()}
    for name in args.cases:
        profile_case(cases[name], args.steps, args.rows)


if __name__ == "__main__":
    main()
