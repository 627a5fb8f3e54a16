"""The layers the architecture promises, checked by reading the source (no import runs):

- orchestrator/ is pure logic: no `ray` or `ray_layer` import anywhere in it, except inside
  a function of the user-facing entry points, which reach the Ray layer lazily;
- ray_layer/ (everything that talks to Ray) never imports the entry points (jobs/, scripts/);
- no import cycle between the project's modules, counting imports inside functions too (a
  lazy import that closes a cycle is still a tangle, only hidden).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from orchestrator.cpython_quirks import retry_spurious_ast_error

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "ray_layer", "jobs", "scripts")
# Entry points inside orchestrator/ that may import the Ray layer, inside a function only.
LAZY_RAY_ALLOWED = {"orchestrator.__main__", "orchestrator.launch"}
RAY_ROOTS = {"ray", "ray_layer"}
ENTRY_ROOTS = {"jobs", "scripts"}


@dataclass(frozen=True)
class Import:
    module: str      # the importing module
    target: str      # the imported module (or package), dotted
    line: int
    in_function: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p
            for package in PACKAGES if (root / package).is_dir()
            for p in sorted((root / package).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    """Every import in the file, with whether it sits inside a function body."""
    source = path.read_text()
    tree = retry_spurious_ast_error(lambda: ast.parse(source, filename=str(path)))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(name, a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(name, path, child)
                # `from package import module` imports the module; `from module import name`
                # only the module.
                targets = [f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in known]
                found.extend(Import(name, t, child.lineno, in_function)
                             for t in targets or [base])
            visit(child, nested)

    visit(tree, False)
    return found


def _absolute(name: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def layer_violations(root: Path) -> list[str]:
    modules = project_modules(root)
    problems = []
    for name, path in modules.items():
        top = name.split(".")[0]
        for imp in imports_of(name, path, set(modules)):
            target_root = imp.target.split(".")[0]
            where = f"{path.relative_to(root)}:{imp.line} imports {imp.target}"
            if top == "orchestrator" and target_root in RAY_ROOTS:
                if not (imp.in_function and name in LAZY_RAY_ALLOWED):
                    problems.append(f"{where}: orchestrator/ is pure logic (Ray lives in "
                                    "ray_layer/)")
            if top in ("orchestrator", "ray_layer") and target_root in ENTRY_ROOTS:
                problems.append(f"{where}: a library module must not import an entry point")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), in a stable order."""
    modules = project_modules(root)
    graph = {name: sorted({imp.target for imp in imports_of(name, path, set(modules))
                           if imp.target in modules and imp.target != name})
             for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(groups)


# -- the checks on this repository ---------------------------------------------------------
def test_orchestrator_is_pure_and_libraries_do_not_import_entry_points():
    assert layer_violations(ROOT) == []


def test_no_import_cycles():
    assert import_cycles(ROOT) == []


def test_the_ray_layer_holds_the_ray_code():
    """Something in ray_layer/ does import Ray (the walk sees real imports, not nothing)."""
    modules = project_modules(ROOT)
    importing_ray = {name for name, path in modules.items() if name.startswith("ray_layer")
                     and any(i.target.split(".")[0] == "ray"
                             for i in imports_of(name, path, set(modules)))}
    assert {"ray_layer.scheduler_actor", "ray_layer.serve_app",
            "ray_layer.train_session"} <= importing_ray


def test_every_test_module_has_a_name_of_its_own():
    """pytest imports a test file as the module its folders name while they are packages
    (hold __init__.py), else as a top-level module named by the file alone (tests/unit and
    tests/integration are not packages): two files of one such name stop the whole run at
    collection ("import file mismatch"), as a clean clone's CI did."""
    by_name: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        by_name.setdefault(_pytest_module_name(path), []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in by_name.items() if len(paths) > 1} == {}


def _pytest_module_name(path: Path) -> str:
    """The name pytest's default import mode (prepend) gives test file `path`."""
    parts, folder = [path.stem], path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts)


# -- the checker itself, on a small tree with known faults ----------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_a_ray_import_and_an_entry_point_import(tmp_path):
    _write(tmp_path, {
        "orchestrator/__init__.py": "",
        "orchestrator/pure.py": "import json\n",
        "orchestrator/leaky.py": "def f():\n    from ray_layer import thing\n",
        "orchestrator/__main__.py": "def main():\n    import ray\n",  # allowed: lazy entry
        "orchestrator/eager.py": "import ray.train\n",
        "ray_layer/__init__.py": "",
        "ray_layer/thing.py": "import ray\nfrom jobs import pretrain\n",
        "jobs/pretrain.py": "from ray_layer import thing\n",
    })
    problems = layer_violations(tmp_path)
    assert [p.split(":")[0] for p in problems] == [
        "orchestrator/eager.py", "orchestrator/leaky.py", "ray_layer/thing.py"]


def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path):
    _write(tmp_path, {
        "orchestrator/__init__.py": "",
        "orchestrator/a.py": "from orchestrator import b\n",
        "orchestrator/b.py": "def f():\n    from .c import x\n",
        "orchestrator/c.py": "import orchestrator.a\n",
        "orchestrator/d.py": "from orchestrator.a import thing\n",  # depends, no cycle
    })
    assert import_cycles(tmp_path) == [["orchestrator.a", "orchestrator.b", "orchestrator.c"]]


def test_every_public_class_in_the_libraries_has_a_docstring():
    missing = []
    for name, path in project_modules(ROOT).items():
        if name.split(".")[0] not in ("orchestrator", "ray_layer"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") \
                    and not ast.get_docstring(node):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert missing == []


def layout_entries() -> dict[str, str]:
    """docs/architecture.md's Layout block: each top-level folder (`orchestrator/`) and each
    entry indented under one (`orchestrator/training/`, `orchestrator/config.py`) -> its text,
    continuation lines included."""
    block = (ROOT / "docs" / "architecture.md").read_text().split("## Layout", 1)[1]
    block = block.split("```", 2)[1]
    entries: dict[str, str] = {}
    top = key = ""
    for line in block.splitlines():
        if line[:1].strip():  # a top-level folder or file
            top = key = line.split()[0]
        elif line[2:3].strip():  # an entry under it
            key = top + line.split()[0]
        entries[key] = entries.get(key, "") + " " + line.strip()
        if key != top:
            entries[top] = entries.get(top, "") + " " + line.strip()
    return entries


def test_architecture_layout_names_every_library_module():
    # The layout is where a reader looks for the module that does X: one left out (the
    # default structured pruning, once) is code nobody finds from the docs.
    entries = layout_entries()
    missing = []
    for name, path in project_modules(ROOT).items():
        parts = name.split(".")
        if parts[0] not in ("orchestrator", "ray_layer") or path.name == "__init__.py":
            continue
        if len(parts) == 2:  # a file of the folder: file.py in the folder's block (not
            # ray_layer/launch.py for orchestrator/launch.py)
            text, word = entries.get(f"{parts[0]}/", ""), path.name
        else:  # a module of a subpackage: its name, as a word, in the subpackage's entry
            text, word = entries.get(f"{parts[0]}/{parts[1]}/", ""), path.stem
        named = re.search(rf"(?<![\w/]){re.escape(word)}\b", text) is not None
        if not named:
            missing.append(str(path.relative_to(ROOT)))
    assert missing == []
