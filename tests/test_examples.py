"""The example notebook runs top to bottom (its code cells, in one namespace, as a
kernel would), the demo's main job runs, and so does the benchmark script."""

import json
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quickstart_notebook_runs(capsys):
    nb = json.loads((ROOT / "examples" / "quickstart.ipynb").read_text())
    namespace = {"__name__": "__main__"}
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code_cells
    for cell in code_cells:
        exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    assert "loss after 20 steps" in capsys.readouterr().out


def test_demo_runs_one_epoch(capsys, tmp_path):
    pytest.importorskip("sklearn")
    from cnnboost import demo

    png = tmp_path / "curves.png"
    demo.main(["--epochs", "1", "--plot", str(png)])
    out = capsys.readouterr().out
    for name in demo.VARIANTS:
        assert f"\n{name} " in out
    if "not plotted" not in out:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_reads_a_cifar10_folder(tmp_path, capsys):
    import pickle

    import numpy as np

    from cnnboost import demo

    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (12, 3 * 32 * 32), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 3, 12))}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f)
    demo.main(["--epochs", "1", "--data", str(tmp_path), "--variants", "baseline,all", "--plot", ""])
    out = capsys.readouterr().out
    assert "19 train / 5 test images (3, 32, 32)" in out and "\nall " in out


def test_demo_reads_an_image_folder(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from PIL import Image

    from cnnboost import demo

    for k in range(2):
        (tmp_path / f"class{k}").mkdir()
        for i in range(5):
            Image.new("RGB", (20, 24), (40 * i, 100 * k, 7)).save(tmp_path / f"class{k}" / f"{i}.png")
    demo.main(["--epochs", "1", "--data", str(tmp_path), "--variants", "ffc", "--plot", ""])
    assert "8 train / 2 test images (3, 32, 32)" in capsys.readouterr().out


def test_demo_rejects_a_missing_folder():
    from cnnboost import demo

    with pytest.raises(SystemExit, match="--data"):
        demo.main(["--data", "/no/such/dir"])


def test_demo_rejects_a_device_it_cannot_use():
    from cnnboost import demo

    with pytest.raises(SystemExit):
        demo.main(["--device", "tpu", "--epochs", "1"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            demo.main(["--device", "cuda", "--epochs", "1"])


@pytest.mark.cuda
def test_demo_trains_on_cuda(capsys, tmp_path):
    from cnnboost import demo

    demo.main(["--device", "cuda", "--epochs", "1", "--variants", "all", "--plot", ""])
    assert "all" in capsys.readouterr().out


def _load_compare():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("compare", ROOT / "benches" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("compare", module)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_times_outside_any_torch_function_mode(capsys, monkeypatch):
    """`benches/compare.py` runs, and its timed calls see no TorchFunctionMode: a
    default device (`torch.set_default_device`) would keep one active, taxing every
    torch call from Python (eager's more than cnnboost's)."""
    import cnnboost
    from cnnboost import reference

    compare = _load_compare()
    seen = []

    def call(m, xs):
        seen.append(torch._C._len_torch_function_stack())
        return m(*xs)

    case = compare.Case("tiny ab eval", lambda cls: cls(8), cnnboost.AB, reference.AB,
                        lambda: [torch.randn(4, 8, 5, 5)], False, bytes=2 * 4 * 8 * 5 * 5 * 4, call=call)
    monkeypatch.setattr(compare, "CASE_GROUPS", {"tiny": lambda: [case]})
    monkeypatch.setattr(compare, "machine_rates", lambda: (1.0, 1.0))
    factory = cnnboost.ab._kernels
    compare.main(["--reps", "2", "--no-compile"])
    out = capsys.readouterr().out
    assert "tiny ab eval" in out and "x" in out.split("tiny ab eval")[1]
    assert "kernels" in out.split("tiny ab eval")[1]  # the time inside the Rust kernels
    assert cnnboost.ab._kernels is factory  # the kernel clock put the factory back
    assert seen and set(seen) == {0}, seen
    assert torch.get_default_device() == torch.device("cpu")
