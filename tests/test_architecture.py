"""The package's imports run one way: data, models -> training -> decision -> evaluation -> runtime ->
export / station -> cli.

Every import in the source is checked, including those inside functions (an import placed in a function to
dodge a cycle is still an arrow), at module granularity (``from defectscope.runtime import card`` is an
import of the module ``card``, not of its package), so that the layering drawn in ARCHITECTURE.md cannot
silently bend. The line's packages (runtime, station) are checked to reach no training-only package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "defectscope"

# Lowest first. A module may import from its own package and from lower layers only; packages sharing a
# layer (data and models) are independent of each other.
LAYERS: list[tuple[str, ...]] = [
    ("defectscope._version", "defectscope.errors", "defectscope.machine"),
    ("defectscope.config", "defectscope.progress", "defectscope.metrics", "defectscope.labels"),
    ("defectscope.data", "defectscope.models"),
    ("defectscope.rundir",),
    ("defectscope.training",),
    ("defectscope.decision",),
    ("defectscope.evaluation", "defectscope.audit"),
    ("defectscope.runtime",),
    ("defectscope.onnx_export", "defectscope.station"),
    ("defectscope.demo",),
    ("defectscope.cli",),
    ("defectscope.__main__",),  # `python -m defectscope`: the cli's main, so above it
]
# What a line PC has not got (`pip install defectscope` without the train extra): the line's packages and
# everything they import, at any depth and inside functions too, must not need them.
LINE_PACKAGES = ("defectscope.runtime", "defectscope.station")
TRAIN_ONLY = ("torch", "torchvision", "timm", "pandas", "sklearn", "onnx", "matplotlib", "yaml", "safetensors",
              "optuna", "pytorch_grad_cam", "imagehash", "elpv_dataset", "skimage")


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


def _is_module(dotted: str) -> bool:
    sub = SRC.parent.joinpath(*dotted.split("."))
    return sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()


def all_imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file, wherever it stands, third-party ones
    included. ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module of ours."""
    tree = ast.parse(path.read_text(), filename=str(path))
    # Imports under `if TYPE_CHECKING:` never run (the package API's lazy names): not arrows.
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("defectscope"):
                found.append((node.lineno, node.module))
                continue
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                # `from defectscope import train` is the API (the package); `from defectscope.runtime import
                # card` is the module card.
                found.append((node.lineno, dotted if _is_module(dotted) else node.module))
    return found


def imports_of(path: Path) -> list[tuple[int, str]]:
    """The imports of our own modules (see :func:`all_imports_of`)."""
    return [(line, name) for line, name in all_imports_of(path)
            if name == "defectscope" or name.startswith("defectscope.")]


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


def _closure(start: str, names: set[str], paths: dict[str, Path]) -> tuple[set[str], dict[str, str]]:
    """Our modules ``start`` pulls in (parent packages' __init__ included) and, for each third-party top-level
    module reached, one module of ours that imports it."""
    seen: set[str] = set()
    third: dict[str, str] = {}
    todo = [start]
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            name = ".".join(parts[:k])
            if name in names and name not in seen:
                seen.add(name)
                for _, target in all_imports_of(paths[name]):
                    if target.startswith("defectscope"):
                        while target not in names and "." in target:
                            target = target.rsplit(".", 1)[0]
                        todo.append(target)
                    else:
                        third.setdefault(target.split(".")[0], name)
    return seen, third


def test_the_line_never_needs_training_packages():
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    names = set(paths)
    line = sorted(n for n in names if n.startswith(LINE_PACKAGES))
    assert len(line) > 10
    wrong = []
    for mod in line:
        _, third = _closure(mod, names, paths)
        wrong += [f"{mod} reaches {pkg} (imported by {by})" for pkg, by in sorted(third.items()) if pkg in TRAIN_ONLY]
    assert not wrong, "the line (runtime/, station/) must run without the train extra:\n" + "\n".join(wrong)


def test_the_closure_sees_an_import_inside_a_function(tmp_path):
    """Guard: a planted torch import inside a function of a line module is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from torch import nn\n    from defectscope.runtime import card\n")
    assert [t for _, t in all_imports_of(bad)] == ["torch", "defectscope.runtime.card"]


def test_no_subpackage_shadows_a_public_name():
    """`defectscope.export` must stay the function once every module is imported (a subpackage of the same
    name would replace the lazy API attribute the moment it is imported)."""
    import importlib

    import defectscope

    for path in SOURCES:
        name = module_name(path)
        if not name.startswith("defectscope.station.store.migrations"):
            importlib.import_module(name)
    for name in defectscope.__all__:
        value = getattr(defectscope, name)
        assert not isinstance(value, type(defectscope)), f"defectscope.{name} is the module {value.__name__}"


def test_architecture_md_lists_every_module_and_the_layers_in_this_order():
    """ARCHITECTURE.md stays true: every module is named in it, and its layer picture is LAYERS."""
    import re

    doc = (SRC.parents[1] / "ARCHITECTURE.md").read_text()
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", doc))
    missing = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
               if "migrations" not in p.parts and p.stem not in words
               and not (p.stem == "__init__" and p.parent.name in words)]
    assert not missing, f"ARCHITECTURE.md does not mention: {missing}"
    picture = doc.split("```")[1]
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s*(\d+)\s+(.*)$", picture, re.M)}
    for i, layer in enumerate(LAYERS, start=1):
        names = [name.split(".")[-1] for name in layer]
        assert all(re.search(rf"(^|\s){re.escape(n)}/?(\s|$)", rows.get(i, "")) for n in names), (i, names, rows.get(i))
    assert len(rows) == len(LAYERS)
