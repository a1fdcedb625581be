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
