"""The .pyi stubs describe every public class, method and function of cnnboost._core."""

import ast
import pathlib

import cnnboost._core as core

STUBS = pathlib.Path(core.__file__).parent / "_core.pyi"


def test_stubs_cover_the_extension():
    tree = ast.parse(STUBS.read_text())
    stub = {n.name: n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    for name in dir(core):
        if name.startswith("_"):
            continue
        assert name in stub, f"_core.{name} has no stub"
        obj = getattr(core, name)
        if isinstance(obj, type):
            members = {m.name for m in stub[name].body if isinstance(m, ast.FunctionDef)}
            missing = [m for m in dir(obj) if not m.startswith("_") and m not in members]
            assert not missing, f"_core.{name}: no stub for {missing}"


def test_package_is_typed():
    assert (STUBS.parent / "py.typed").exists()


def test_core_reprs_read_like_python():
    for eps in (1e-5, 1e-3, 0.1, 2.5e-7, 1e20):
        assert repr(core.FFC(3, "paper", eps)) == f"FFC(num_filters=3, combine='paper', eps={eps!r})"
        assert repr(core.AB(8, 2, eps)) == f"AB(channels=8, groups=2, eps={eps!r})"
        assert repr(core.SSM(4, True, eps)) == f"SSM(num_heads=4, norm_last_head=True, eps={eps!r})"
    assert repr(core.AFI(16, 4)) == "AFI(channels=16, hidden=4)"
