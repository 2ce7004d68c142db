"""The layout shows the architecture (DESIGN): checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pruneplan

PKG = Path(pruneplan.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def files(sub: str) -> list[Path]:
    target = PKG / sub
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


def forbidden(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imports_of(path) if m.split(".")[0] in prefixes or m.startswith(prefixes))


RULES = [
    ("plan.py", ("torch", "numpy", "safetensors")),
    ("hf_config.py", ("torch", "numpy", "safetensors", "transformers", "pruneplan.graph",
                      "pruneplan.apply", "pruneplan.planner")),
    ("compose.py", ("torch", "numpy", "safetensors", "pruneplan.graph", "pruneplan.apply",
                    "pruneplan.planner")),
    ("errors.py", ("torch", "numpy", "pydantic", "pruneplan.")),
    ("attributions", ("pruneplan.plan", "pruneplan.planner", "pruneplan.apply", "pruneplan.graph",
                      "pruneplan.select", "pruneplan.pruner", "pruneplan.cli")),
    ("apply", ("pruneplan.attributions", "pruneplan.select", "pruneplan.planner", "pruneplan.pruner",
               "pruneplan.graph", "pruneplan.cli")),
    ("distributed.py", ("numpy", "pruneplan.attributions", "pruneplan.graph", "pruneplan.apply",
                        "pruneplan.planner", "pruneplan.select", "pruneplan.pruner", "pruneplan.cli")),
    ("graph", ("pruneplan.plan", "pruneplan.planner", "pruneplan.apply", "pruneplan.attributions",
               "pruneplan.cli")),
    # tied tensors: shared by graph, planner and apply, so it imports none of them
    ("_tied.py", ("numpy", "safetensors", "pydantic", "pruneplan.")),
]


@pytest.mark.parametrize(("sub", "banned"), RULES, ids=[r[0] for r in RULES])
def test_layer_does_not_import_upward(sub: str, banned: tuple[str, ...]) -> None:
    checked = files(sub)
    assert checked, sub
    for path in checked:
        assert forbidden(path, banned) == [], path


def test_cli_uses_only_the_public_api() -> None:
    mods = {m for m in imports_of(PKG / "cli.py") if m.startswith("pruneplan")}
    names = {m.removeprefix("pruneplan.") for m in mods if m != "pruneplan"}
    # the public API, plus `loading`: the public helpers that turn CLI strings into objects
    allowed = {*pruneplan.__all__, "loading"}
    assert names <= allowed, names - allowed


def test_no_star_imports_and_explicit_all() -> None:
    for path in files("."):
        tree = ast.parse(path.read_text())
        stars = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names)]
        assert stars == [], path
    assert "PrunePlan" in pruneplan.__all__ and "apply_plan" in pruneplan.__all__
    assert all(hasattr(pruneplan, name) for name in pruneplan.__all__)


def test_the_layering_check_can_fail(tmp_path: Path) -> None:
    # the checker itself must see an upward import (guards against a vacuous pass)
    bad = PKG / "plan.py"
    assert "pydantic" in imports_of(bad)
    assert forbidden(bad, ("pydantic",)) == ["pydantic"] or "pydantic" in forbidden(bad, ("pydantic",))


def test_tied_keys_has_one_implementation() -> None:
    from pruneplan import _tied, planner
    from pruneplan.apply import _hf
    from pruneplan.graph import _analysis

    assert planner.tied_keys is _tied.tied_keys and _hf.tied_keys is _tied.tied_keys
    assert _analysis.tied_keys is _tied.tied_keys
    for mod in (planner, _hf, _analysis):
        assert "def tied_keys" not in Path(mod.__file__).read_text() and "def _tied" not in Path(
            mod.__file__).read_text()
