#!/usr/bin/env bash
# Builds the `cnnboost-cuda` wheel (cuda/pyproject.toml: module `cnnboost_cuda`, features
# python+cuda, abi3) on a machine without a GPU, with the CUDA 13.0 toolchain from PyPI
# wheels (scripts/cuda-toolchain.sh). The wheel goes to dist/.
#
# Linking wants libcuda.so, which only the driver ships: a stub (soname libcuda.so.1,
# every cu* entry point cudarc binds returning CUDA_ERROR_UNKNOWN) is built into
# .cuda-toolchain/stub/ and put on LIBRARY_PATH for the link only. It is never shipped:
# `--auditwheel skip` keeps maturin from bundling it (or the CUDA libraries) into the
# wheel; the real libcuda.so.1 and the CUDA 13 libraries must be on the target machine.
# Env: PYTHON, CUDA_COMPUTE_CAP (default 90), MATURIN (default maturin), CARGO_TARGET_DIR.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/cuda-toolchain.sh
source "$repo/scripts/cuda-toolchain.sh"

maturin=${MATURIN:-maturin}
command -v "$maturin" >/dev/null || cuda_die "'$maturin' is not on PATH (pip install 'maturin>=1.9,<2')"
command -v cc >/dev/null || cuda_die "no C compiler (cc) to build the libcuda stub with"
cuda_toolchain_setup "$repo"
python=${PYTHON:-python3}

stub="$CUDA_TOOLCHAIN_DIR/stub"
if [[ ! -f "$stub/libcuda.so" ]]; then
    mkdir -p "$stub"
    # The driver API functions cudarc declares (a superset over CUDA versions: harmless).
    cudarc_dir=$(cargo metadata --quiet --format-version 1 --locked --features cuda \
        --manifest-path "$repo/Cargo.toml" |
        "$python" -c 'import json, os, sys
pkgs = json.load(sys.stdin)["packages"]
print(next(os.path.dirname(p["manifest_path"]) for p in pkgs if p["name"] == "cudarc"))') ||
        cuda_die "could not locate the cudarc sources with cargo metadata"
    grep -ohE '^\s+fn cu[A-Za-z0-9_]+\(' "$cudarc_dir/src/driver/sys/mod.rs" |
        sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u |
        sed 's/.*/int &(void) { return 999; }/' >"$stub/libcuda_stub.c"
    [[ -s "$stub/libcuda_stub.c" ]] || cuda_die "no cu* functions found in $cudarc_dir/src/driver/sys/mod.rs"
    cc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so.tmp" "$stub/libcuda_stub.c" ||
        cuda_die "could not build the libcuda stub"
    mv "$stub/libcuda.so.tmp" "$stub/libcuda.so"
fi
export LIBRARY_PATH="$stub:$LIBRARY_PATH"

log="$CUDA_TOOLCHAIN_DIR/maturin.log"
if ! (cd "$repo/cuda" && "$maturin" build --release --locked --auditwheel skip \
    --out "$repo/dist") >"$log" 2>&1; then
    grep -E '^(error|warning: unused)|error:|undefined reference|cannot find' "$log" | head -n 40 >&2 || tail -n 40 "$log" >&2
    cuda_die "maturin could not build the cnnboost-cuda wheel (full log: $log)"
fi
wheel=$(grep -oE '[^ ]*cnnboost_cuda-[^ ]*\.whl' "$log" | tail -n 1)
[[ -n "$wheel" ]] || cuda_die "maturin succeeded but named no wheel (log: $log)"
# Never ship the stub (nor any libcuda).
"$python" -c 'import sys, zipfile; sys.exit(any("libcuda" in n for n in zipfile.ZipFile(sys.argv[1]).namelist()))' \
    "$wheel" || cuda_die "$wheel contains a libcuda: the stub must never ship"
echo "$wheel"
