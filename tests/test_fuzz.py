"""The fuzz target's contract on random inputs, and every input the fuzzer ever
found a crash with (fuzz/regressions/)."""

import pathlib
import sys

import numpy as np
import pytest

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))
import fuzz_core  # noqa: E402


def test_random_inputs_only_raise_clean_errors():
    rng = np.random.default_rng(0)
    for _ in range(1500):
        fuzz_core.TestOneInput(rng.bytes(int(rng.integers(1, 128))))


@pytest.mark.parametrize("path", sorted(p for p in (FUZZ / "regressions").iterdir() if p.name != ".keep"),
                         ids=lambda p: p.name)
def test_regression(path):
    fuzz_core.TestOneInput(path.read_bytes())
