#!/usr/bin/env bash
# The GPU checks, in one run on a machine with an NVIDIA GPU, a cu13x torch and pytest
# (the lent H200s: no network, so nothing is fetched). Installs the two wheels from dist/
# (`maturin build --release -o dist` and scripts/build-cuda-wheel.sh, built beforehand on
# any x86-64 machine) into a private folder, then, each step under its own time limit (a
# failed smoke test stops the run; the exit status is the first failure's):
#   1. a smoke test: one AB step on the GPU, in two processes one after the other;
#   2. `pytest -m cuda` (tests/test_cuda.py, and the demo for one epoch);
#   3. `benches/compare.py --device cuda`, without torch.compile, then (if STEPS says so)
#      with it.
# Logs go to $OUT (default: ./gpu-check-out). Env: STEPS (default "smoke tests bench"; add
# "compile" for the torch.compile columns, "torch-route" / "torch-compile" for the benchmark
# of the route a GPU without the CUDA build takes, "profile" for benches/profile_cuda.py on
# five cases, "demo" for three epochs of the demo by each route), REPS (default 10).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
mkdir -p "$out"
steps=${STEPS:-smoke tests bench}
reps=${REPS:-10}
python=${PYTHON:-python3}
site=/tmp/cnnboost-site

status=0
step() { # step NAME SECONDS CMD...: run with a limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*"
    PYTHONUNBUFFERED=1 timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc"
    [[ $status -ne 0 ]] || status=$rc
    return "$rc"
}

nvidia-smi -L
rm -rf "$site"
"$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" dist/cnnboost-*.whl \
    dist/cnnboost_cuda-*.whl || exit 1
export PYTHONPATH=$site
# cnnboost_cuda links the CUDA 13 libraries by soname; torch's nvidia-* packages hold them.
nvlibs=$("$python" -c 'import glob, os, nvidia
print(":".join(d for p in nvidia.__path__ for d in sorted(glob.glob(os.path.join(p, "**", "lib"), recursive=True))))' 2>/dev/null)
export LD_LIBRARY_PATH=${nvlibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

smoke='
import time, torch, cnnboost, cnnboost_cuda
print("torch", torch.__version__, torch.cuda.get_device_name())
torch.ones(1, device="cuda").sum().item()  # torch'"'"'s own start, not timed
m = cnnboost.AB(8).cuda()
x = torch.randn(4, 8, 5, 5, device="cuda", requires_grad=True)
t = time.perf_counter(); y = m(x); y.sum().backward(); torch.cuda.synchronize()
print("one AB step on", y.device, f"in {time.perf_counter() - t:.3f}s; grad finite:", bool(x.grad.isfinite().all()))
'
if [[ $steps == *smoke* ]]; then
    # Twice: the first process on a machine JIT-compiles candle's PTX (the driver caches it).
    step smoke 120 "$python" -c "$smoke" || { ldd "$site"/cnnboost_cuda/*.so | tee "$out/ldd.log"; exit 1; }
    step smoke-again 60 "$python" -c "$smoke"
fi
[[ $steps == *tests* ]] && step tests 150 "$python" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py tests/test_examples.py
[[ $steps == *bench* ]] && step bench 120 "$python" benches/compare.py --device cuda --no-compile --reps "$reps"
[[ $steps == *torch-route* ]] && step torch-route 120 "$python" benches/compare.py --device cuda --no-compile \
    --no-cuda-build --reps "$reps"
[[ $steps == *profile* ]] && step profile 150 "$python" benches/profile_cuda.py "ab eval 32x256x56x56" \
    "ab train 32x256x56x56" "afi train 3x32x64x56x56" "ffc train 256x2048" "ssm train 256x2048"
[[ $steps == *" compile"* || $steps == compile* ]] && step compile 200 "$python" benches/compare.py --device cuda --reps "$reps"
[[ $steps == *torch-compile* ]] && step torch-compile 200 "$python" benches/compare.py --device cuda --no-cuda-build \
    --reps "$reps"
demo='import sys, cnnboost._torch as t, cnnboost.demo as d
if sys.argv[1] == "torch": t._cuda_build[:] = [None]
d.main(["--device", "cuda", "--epochs", "3", "--plot", ""])'
[[ $steps == *demo* ]] && step demo 110 "$python" -c "$demo" build
[[ $steps == *demo* ]] && step demo-torch 110 "$python" -c "$demo" torch
echo "== done ($(date +%T)): status $status"
exit "$status"
