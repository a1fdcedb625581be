"""The example notebook runs top to bottom (its code cells, in one namespace, as a
kernel would), and the demo's main job runs."""

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
