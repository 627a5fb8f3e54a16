"""pyproject.toml declares what the code imports: every third-party module that product code,
entry points, scripts and examples import comes with `pip install -e .` (a declared
dependency or one of theirs), and every one the tests import with `pip install -e ".[test]"`.
Something installed here by chance but declared nowhere fails CI's clean install instead."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
OWN = {"orchestrator", "ray_layer", "jobs", "scripts", "tests", "examples"}
PRODUCT = ("orchestrator", "ray_layer", "jobs", "scripts", "examples")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """The distributions installing `requirements` brings in (as installed here), extras and
    environment markers honoured."""
    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (_norm(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        try:
            needs = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here: nothing of it is imported here either
        for text in needs:
            need = Requirement(text)
            if need.marker is None or any(need.marker.evaluate({"extra": extra})
                                          for extra in (req.extras or {""})):
                todo.append(need)
    return names


def _imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in `path` (lazy ones in functions included),
    less the standard library, this repository's packages and modules beside the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names - OWN - set(sys.stdlib_module_names)
            if not (path.parent / f"{name}.py").exists() and not (path.parent / name).is_dir()}


def _undeclared(files: list[Path], declared: set[str]) -> list[str]:
    providers = metadata.packages_distributions()
    problems = []
    for path in files:
        for name in sorted(_imports(path)):
            dists = {_norm(d) for d in providers.get(name, ())}
            # A module no installed distribution provides cannot be imported here either (a
            # test's temporary module): only what is installed yet undeclared is looked for.
            if dists and not dists & declared:
                where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                problems.append(f"{where}: import {name} "
                                f"(from {sorted(dists)}) is not in pyproject.toml's closure")
    return problems


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_product_code_imports_only_what_pip_install_brings():
    files = [p for top in PRODUCT for p in sorted((REPO / top).rglob("*.py"))]
    assert len(files) > 100
    assert _undeclared(files, _closure(_project()["dependencies"])) == []


def test_the_tests_import_only_what_the_test_extra_brings():
    project = _project()
    declared = _closure(project["dependencies"] + project["optional-dependencies"]["test"])
    files = sorted((REPO / "tests").rglob("*.py"))
    assert _undeclared(files, declared) == []


def test_an_import_of_something_installed_but_not_declared_is_named(tmp_path):
    # pytest is installed here, and is only in the test extra: product code importing it
    # would fail on `pip install -e .`.
    script = tmp_path / "helper.py"
    script.write_text("import json\n\ndef f():\n    import pytest\n    import torch\n")
    base = _closure(_project()["dependencies"])
    assert [p.split(": ")[1] for p in _undeclared([script], base)] == [
        "import pytest (from ['pytest']) is not in pyproject.toml's closure"]
