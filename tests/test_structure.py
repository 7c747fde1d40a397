"""The module graph reads top-down (cli -> build/tuning -> lower/schedules -> models/export -> runtime):
no import cycle among mbn_codegen's modules, counting imports inside functions as well as at the top.

A deliberate exception carries `# import-cycle: <why>` on its import line; that one edge is ignored.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# pyproject's package-dir: these two live outside mbn_codegen/
PACKAGES = {"mbn_codegen": REPO / "mbn_codegen", "mbn_codegen.schedules": REPO / "schedules",
            "mbn_codegen.targets": REPO / "targets"}
MARKER = "# import-cycle:"


def modules(packages: dict[str, Path]) -> dict[str, Path]:
    found = {}
    for pkg, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if not any(name.startswith(other + ".") or name == other
                       for other in packages if other != pkg and other.startswith(pkg + ".")):
                found[name] = path
    return found


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules it imports (anywhere in its body), and the packages above them."""
    graph = {}
    for name, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or MARKER in lines[node.lineno - 1]:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in mods else origin for a in node.names]
            for t in targets:
                while t:
                    if t in mods and t != name and not name.startswith(t + "."):
                        deps.add(t)
                    t = t.rpartition(".")[0]
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(graph: dict[str, set[str]], comp: list[str]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(comp)))}" for m in comp)


def test_no_import_cycles():
    mods = modules(PACKAGES)
    assert {"mbn_codegen.build", "mbn_codegen.tuning", "mbn_codegen.schedules", "mbn_codegen.cli.main"} <= set(mods)
    graph = import_graph(mods)
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(_describe(graph, c) for c in found)


def test_tuning_does_not_import_build():
    graph = import_graph(modules(PACKAGES))
    assert "mbn_codegen.build" not in graph["mbn_codegen.tuning"]
    assert "mbn_codegen.model_spec" in graph["mbn_codegen.tuning"]


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    root = tmp_path / "pkg"
    root.mkdir()
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).write_text(text)
    return modules({"pkg": root})


def test_detector_sees_function_level_cycles(tmp_path):
    mods = _package(tmp_path, {"a.py": "from .b import g\n", "b.py": "def g():\n    from .a import x\n",
                               "c.py": "import pkg.a\n"})
    graph = import_graph(mods)
    assert graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_detector_skips_a_documented_lazy_import(tmp_path):
    mods = _package(tmp_path, {"a.py": "from .b import g\n",
                               "b.py": f"def g():\n    from .a import x  {MARKER} a needs g at import\n"})
    assert cycles(import_graph(mods)) == []
