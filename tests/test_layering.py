"""The layers import only downwards: infer <- evaluation <- train <- scripts (tests may import
anything; nothing imports tests), and no two modules import each other, directly or around a
loop. Imports are read with ``ast`` (the code is not run), function-level imports included."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("infer", "evaluation", "train", "scripts")  # each may import those before it


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def _imports(name: str, is_package: bool, source: str, known) -> set:
    """The project modules that module ``name`` (source text ``source``) imports: ``from pkg
    import mod`` counts as ``pkg.mod``, ``from pkg import name`` as ``pkg``; any import from
    ``tests`` as "tests"."""
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            groups = [[a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            groups = [[f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known] or [base]]
        else:
            continue
        for t in (t for g in groups for t in g):
            if t.split(".")[0] == "tests":
                out.add("tests")
                continue
            while t and t not in known and "." in t:
                t = t.rpartition(".")[0]
            if t in known and t != name:
                out.add(t)
    return out


def _graph() -> dict:
    mods = _modules()
    return {name: _imports(name, path.name == "__init__.py", path.read_text(), mods) for name, path in mods.items()}


def test_no_upward_import():
    bad = []
    for name, deps in _graph().items():
        mine = LAYERS.index(name.split(".")[0])
        for dep in deps:
            top = dep.split(".")[0]
            if top == "tests" or LAYERS.index(top) > mine:
                bad.append(f"{name} -> {dep}")
    assert not bad, "imports against the layering (infer <- evaluation <- train <- scripts):\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state and dep in graph:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("snippet, expected", [
    ("from .geometry import Crop", {"infer.geometry"}),
    ("from . import geometry", {"infer.geometry"}),
    ("import infer.geometry as g", {"infer.geometry"}),
    ("from infer import geometry", {"infer.geometry"}),
    ("def f():\n    from tests.tinymodel import tiny_arch", {"tests"}),
])
def test_imports_are_read_as_written(snippet, expected):
    known = {"infer", "infer.geometry", "infer.probe"}
    assert _imports("infer.probe", False, snippet, known) == expected


def test_every_image_module_is_in_the_design_module_table():
    """docs/DESIGN.md's table of infer/ lists each module of the image once, and no module that is
    gone (a row's first cell is the file name in backquotes)."""
    text = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    table = text.split("## infer/ (the image)", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines()
            if line.startswith("| `")]
    files = sorted(p.name for p in (ROOT / "infer").glob("*.py") if p.name != "__init__.py")
    assert sorted(rows) == files
