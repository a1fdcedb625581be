#!/usr/bin/env bash
# Measured from scratch (no .cuda-toolchain/, empty CARGO_TARGET_DIR, pip cache off, crates
# already in ~/.cargo) on the 2-core dev machine: 21 min 17 s wall, 20.8 min CPU; the wheels
# took 20 s, the Rust dependencies and candle-kernels' PTX ~4 min, then candle-kernels'
# libmoe.a (nvcc, mmq/moe kernels; the long pole, nothing else runs meanwhile) ~17 min.
# The 2 cores were shared with another CUDA build and a pytest run (load ~6), so an idle
# 2-core runner should be faster (not measured). Reruns take <1 s. For CI, caching
# .cuda-toolchain/ and the target dir saves nearly all of it.
#
# Compile-checks the `cuda` feature (`cargo check --release --features cuda,python`) on a
# machine without a GPU and without a system CUDA install: a CUDA 13.0 toolchain comes from
# PyPI wheels into .cuda-toolchain/ (scripts/cuda-toolchain.sh). `cargo check` runs the
# build scripts, so candle-kernels' PTX and libmoe.a really go through nvcc and cudarc's
# build script really detects the toolkit; only linking is skipped.
#
# Idempotent: the toolchain is installed once (reinstalled when its pins change) and cargo's
# own caching does the rest. Quiet: prints nothing but cargo's warnings and errors on success.
# Env: PYTHON (python with pip, default python3), CUDA_COMPUTE_CAP (default 90),
# CARGO_TARGET_DIR (as cargo uses it).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/cuda-toolchain.sh
source "$repo/scripts/cuda-toolchain.sh"

command -v cargo >/dev/null || cuda_die "cargo is not on PATH"
cuda_toolchain_setup "$repo"

if ! cargo check --quiet --release --locked --features cuda,python \
    --manifest-path "$repo/Cargo.toml"; then
    cuda_die "cargo check --release --features cuda,python failed (see above; toolchain: $CUDA_ROOT)"
fi
