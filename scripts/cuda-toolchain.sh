# Sourced by scripts/check-cuda.sh and scripts/build-cuda-wheel.sh (bash; `set -euo pipefail`
# is expected). Installs a CUDA 13.0 toolchain from PyPI wheels into .cuda-toolchain/ (git
# ignored; the project's .venv is not touched) and exports what nvcc, cudaforge (the
# candle-kernels build script) and cudarc's build script look for. No GPU, no driver and no
# system CUDA are needed. See ../shared/TOOLCHAIN.md, "CUDA build without a GPU".
#
# Pinned to CUDA 13.0 (update 2): the lent GPUs run driver 580 = CUDA 13.0, and PTX from a
# newer nvcc may not load there; cudarc 0.19 refuses nvcc newer than 13.4 anyway. Changing
# this list reinstalls the toolchain on the next run.
CUDA_WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
)

cuda_die() {
    echo "error: $*" >&2
    exit 1
}

# cuda_toolchain_setup REPO_ROOT: install (once) and export the environment.
cuda_toolchain_setup() {
    local repo=$1
    local dir="$repo/.cuda-toolchain"
    local python=${PYTHON:-python3}
    local want
    want=$(printf '%s\n' "${CUDA_WHEELS[@]}")
    CUDA_TOOLCHAIN_DIR=$dir
    CUDA_ROOT_DIR="$dir/pkgs/nvidia/cu13"

    if [[ ! -f "$dir/installed" || "$(cat "$dir/installed")" != "$want" ]]; then
        command -v "$python" >/dev/null || cuda_die "no '$python' to run pip with (set PYTHON=...)"
        rm -rf "$dir"
        mkdir -p "$dir"
        # --no-deps: every wheel the toolchain needs is listed, at a pinned version.
        if ! "$python" -m pip install --quiet --disable-pip-version-check --no-input \
            --no-deps --only-binary=:all: --target "$dir/pkgs" "${CUDA_WHEELS[@]}" \
            >"$dir/pip.log" 2>&1; then
            tail -n 20 "$dir/pip.log" >&2
            cuda_die "pip could not install the CUDA 13.0 wheels into $dir (log: $dir/pip.log)"
        fi
        [[ -x "$CUDA_ROOT_DIR/bin/nvcc" ]] ||
            cuda_die "the wheels installed, but $CUDA_ROOT_DIR/bin/nvcc is missing (wheel layout changed?)"
        # The wheels ship only versioned libraries (libcublas.so.13, ...); the linker
        # (-lcublas) wants the unversioned names.
        local lib so
        for lib in cublas cublasLt curand nvrtc cudart; do
            so=$(cd "$CUDA_ROOT_DIR/lib" && ls "lib$lib.so."* 2>/dev/null | sort -V | head -n 1)
            [[ -n "$so" ]] || cuda_die "lib$lib.so.* not found in $CUDA_ROOT_DIR/lib"
            ln -sfn "$so" "$CUDA_ROOT_DIR/lib/lib$lib.so"
        done
        echo "$want" >"$dir/installed"
    fi

    export CUDA_ROOT="$CUDA_ROOT_DIR" CUDA_PATH="$CUDA_ROOT_DIR" CUDA_HOME="$CUDA_ROOT_DIR"
    export NVCC="$CUDA_ROOT_DIR/bin/nvcc"
    export PATH="$CUDA_ROOT_DIR/bin:$PATH"
    export LIBRARY_PATH="$CUDA_ROOT_DIR/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
    # No nvidia-smi to ask: build for the lent H200s (sm_90) unless told otherwise.
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    # candle-kernels' build script (cudaforge) runs nvcc on half the cores by default, and
    # compiling its libmoe.a is the long pole of the whole build, run when cargo has nothing
    # else left to do: use them all.
    export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
    "$NVCC" --version >/dev/null 2>&1 || cuda_die "$NVCC does not run"
}
