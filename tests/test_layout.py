"""The package's rooms and the direction of imports (docs/ARCHITECTURE.md): no circle, nothing below imports
anything above it. Function-level (lazy) imports count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pfdiff_bench"

# lower rank = further down the data flow's foundations; a module may import only ranks <= its own
RANKS = {
    "pfdiff_bench": 0, "errors": 0, "files": 0, "seeding": 0, "download": 0, "schedules": 0, "grids": 1, "config": 0,
    "models": 2, "samplers": 3, "sampling": 4, "evaluation": 5, "diffusers": 5, "reproduction": 6, "cli": 7,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pfdiff_bench"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("pfdiff_bench"):
            out.add(node.module)
            for a in node.names:  # `from pfdiff_bench.sampling import rundir` imports a submodule
                sub = f"{node.module}.{a.name}"
                if (PKG.parent / (sub.replace(".", "/") + ".py")).is_file() \
                        or (PKG.parent / sub.replace(".", "/")).is_dir():
                    out.add(sub)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_room_has_a_rank():
    rooms = {_room(m) for m in _graph()}
    assert rooms <= set(RANKS), f"modules outside the known rooms: {sorted(rooms - set(RANKS))}"


def test_imports_point_one_way():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if RANKS[_room(dep)] > RANKS[_room(mod)]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports pointing upstream:\n" + "\n".join(sorted(bad))


def test_no_import_circle():
    graph = _graph()
    graph = {m: {d for d in deps if d in graph and d != m and not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layering_check_can_fail(tmp_path):
    # the checker itself: an upstream import and a circle are both seen
    (tmp_path / "a.py").write_text("from pfdiff_bench.cli import main\n")
    assert "pfdiff_bench.cli" in _imports(tmp_path / "a.py")
    assert RANKS["cli"] > RANKS["models"]
