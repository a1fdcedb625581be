"""The example notebook runs top to bottom (its code cells, in one namespace, as a
kernel would), and the demo's main job runs."""

import json
import pathlib

import pytest

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
