"""The package layering of ftdist, checked on the source: every import (module-level and inside functions)
goes down the layer order, never up and never round in a cycle.

The order, lowest first (a package imports only from its own layer or the layers before it):
    errors   ftdist's own error types (every package raises them)
    algos    losses as pure torch functions
    config   the recipe schema, loading and validation
    run      services every entry point shares: logging, seeding, stop requests, metrics, progress, cache
    data, models   siblings: data never imports models (models may read the bundled task's text)
    engine   the only importer of DeepSpeed
    train, eval    siblings that never import each other
    rl       PPO: workers, Ray shells, driver
    plan, merge, export   the other verbs
    infer    `ftdist generate` and `ftdist chat` (reads a run's checkpoint through export)
    evaluate `ftdist eval` (loads models through infer)
    cli      the command line
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "ftdist"
LAYERS = [("errors",), ("algos",), ("config",), ("run",), ("data", "models"), ("engine",), ("train", "eval"), ("rl",),
          ("plan", "merge", "export"), ("infer",), ("evaluate",), ("cli",), ("__main__",)]
# imports allowed inside a layer, and why
WITHIN = {("models", "data"): "the tiny model trains its tokenizer on the bundled task's text"}
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _targets(node) -> list[str]:
    """The ftdist packages an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("ftdist.")]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        parts = node.module.split(".")
        if parts[0] != "ftdist":
            return []
        return [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
    return []


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the places, as file:line."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _package_of(path)
        if src == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for dst in _targets(node):
                if dst != src:
                    edges.setdefault((src, dst), []).append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return edges


def test_every_package_has_a_layer():
    packages = {_package_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert packages <= set(LEVEL), f"place these in LAYERS: {sorted(packages - set(LEVEL))}"


def test_imports_go_down_the_layer_order():
    wrong = []
    for (src, dst), where in sorted(import_edges().items()):
        if dst not in LEVEL:
            continue  # a module of the top package (ftdist/__init__), e.g. __version__
        if LEVEL[dst] > LEVEL[src] or (LEVEL[dst] == LEVEL[src] and (src, dst) not in WITHIN):
            wrong.append(f"{src} -> {dst} at {', '.join(where)}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for src, dst in import_edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(p for p in graph if reaches(p, p, {p}))
    assert not cycles, f"packages on an import cycle: {cycles}"


def test_the_check_sees_function_level_imports():
    """An import inside a function counts like one at the top (hiding a cycle there is what this guards)."""
    tree = ast.parse("def f():\n    from ftdist.rl.driver import PPODriver\n")
    assert [t for node in ast.walk(tree) for t in _targets(node)] == ["rl"]
