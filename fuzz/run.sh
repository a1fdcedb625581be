#!/usr/bin/env bash
# Coverage-guided fuzzing of cnnboost._core for a bounded time (default 60 s).
# Needs the package installed and atheris (pip install -e '.[fuzz]').
# A crash is saved as fuzz/crash-*: move it into fuzz/regressions/ (tests replay it).
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
mkdir -p corpus
python fuzz_core.py -max_total_time="$seconds" -artifact_prefix=./ corpus
