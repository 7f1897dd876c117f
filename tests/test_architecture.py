"""The package's imports run one way: data, models -> training -> decision -> evaluation -> deploy -> cli.

Every import in the source is checked, including those inside functions (an import placed in a function to
dodge a cycle is still an arrow), so that the layering drawn in ARCHITECTURE.md cannot silently bend.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "defectscope"

# Lowest first. A module may import from its own package and from lower layers only; packages sharing a
# layer (data and models) are independent of each other.
LAYERS: list[tuple[str, ...]] = [
    ("defectscope._version", "defectscope.config", "defectscope.logs", "defectscope.metrics"),
    ("defectscope.data", "defectscope.models"),
    ("defectscope.rundir",),
    ("defectscope.training",),
    ("defectscope.decision",),
    ("defectscope.evaluation", "defectscope.audit"),
    ("defectscope.deploy",),
    ("defectscope.demo",),
    ("defectscope.cli",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> tuple[int, str] | None:
    """(layer index, the layer entry owning ``module``), by longest matching prefix."""
    best = None
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    return best


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "defectscope":
                # `from defectscope import rundir` names a submodule; `from defectscope import train` is the API.
                for alias in node.names:
                    sub = SRC / alias.name
                    is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                    found.append((node.lineno, f"defectscope.{alias.name}" if is_module else "defectscope"))
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "defectscope" or name.startswith("defectscope.")]


SOURCES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_run_one_way(path):
    me = module_name(path)
    mine = unit_of(me)
    assert mine is not None, f"{me} is in no layer of ARCHITECTURE.md; add it to LAYERS"
    wrong = []
    for line, target in imports_of(path):
        if target == "defectscope":
            wrong.append(f"line {line}: imports the package API (defectscope/__init__); import the module itself")
            continue
        theirs = unit_of(target)
        assert theirs is not None, f"{me} line {line}: {target} is in no layer"
        if theirs[1] == mine[1]:
            continue
        if theirs[0] >= mine[0]:
            wrong.append(f"line {line}: {target} ({theirs[1]}, layer {theirs[0]}) from layer {mine[0]}")
    assert not wrong, f"{me} imports backwards or sideways:\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    names = {module_name(p) for p in SRC.rglob("*.py")}
    for path in SRC.rglob("*.py"):
        targets = set()
        for _, target in imports_of(path):
            # `from defectscope.x import name` may name a module or an attribute: keep the longest module.
            while target not in names and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in names and target != module_name(path):
                targets.add(target)
        graph[module_name(path)] = targets
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_checker_catches_a_backward_import(tmp_path):
    """Guard against a check that proves nothing: a planted backward import is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from defectscope.evaluation.evaluate import evaluate\n")
    (line, target), = imports_of(bad)
    assert unit_of(target)[0] > unit_of("defectscope.training.loop")[0]
