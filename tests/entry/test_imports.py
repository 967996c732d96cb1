"""Import structure of the package, read from the source with ``ast`` (nothing is imported):
no import cycles among the package's modules, and nothing in the package imports the
repository's entry-point folders (``bench/``, ``examples/``, formerly ``python/``).

Every ``import`` / ``from ... import`` statement counts, at module level or inside a function
(a deferred import is still a dependency, and one that hides a cycle from the interpreter), and
so does ``importlib.import_module`` with a literal name. An import of ``a.b.c`` is an edge to
``a.b.c`` only: its parent packages' ``__init__`` run first, but a package's ``__init__``
re-exporting its modules does not make them depend on each other. ``from a.b import c`` is an
edge to the module ``a.b.c`` when there is one, else to ``a.b`` (which defines ``c``).
Relative imports are resolved against the importing module.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = "eagle2_kernels"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE
# Top-level folders of the repository above the package: benchmarks and runnable examples
# (``python/`` is the examples' former name).
ENTRY_FOLDERS = ("bench", "examples", "python")


def module_files(root: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file for every .py under ``root`` (a package's
    ``__init__.py`` under the package's own name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package, *parts))] = path
    return out


def _relative_base(module: str, is_package: bool, level: int, name: str | None) -> str:
    # `from ..x import y` in `module`: the absolute name of `..x`.
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(parts):
        raise ValueError(f"{module}: relative import beyond the top-level package")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Absolute names of the modules that the imports in ``source`` (the code of ``module``)
    load, at any depth of the code; ``known`` tells ``from m import x`` of a module ``m.x``
    from that of a name defined in ``m``."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _relative_base(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            out.add(node.args[0].value)
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ``files`` it imports (itself excluded)."""
    known = set(files)
    graph = {}
    for module, path in files.items():
        names = imported_modules(path.read_text(), module, path.name == "__init__.py", known)
        graph[module] = {n for n in names if n in known and n != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle ``[a, b, ..., a]`` per strongly connected component of more than one
    module (Tarjan's algorithm), sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in components:
        # breadth-first inside the component from its first module until an edge leads back
        start = min(comp)
        parent, queue, last = {start: None}, deque([start]), None
        while last is None:
            v = queue.popleft()
            for w in sorted(graph[v] & comp):
                if w == start:
                    last = v
                    break
                if w not in parent:
                    parent[w] = v
                    queue.append(w)
        path = [last]
        while path[-1] != start:
            path.append(parent[path[-1]])
        out.append(path[::-1] + [start])
    return sorted(out)


# ------------------------------------------------------------------------------- the checks

FILES = module_files()
GRAPH = import_graph(FILES)
CYCLES = cycles(GRAPH)


def test_graph_builder_on_known_edges():
    """The parser sees module-level, function-level and relative imports (so an empty cycle
    list means something)."""
    assert len(FILES) > 50 and "eagle2_kernels.ops" in FILES and "eagle2_kernels.cli" in FILES
    # module level, `from pkg import module`
    assert "eagle2_kernels._native" in GRAPH["eagle2_kernels._backend"]
    # inside a function (report.bench_report imports plots when asked for plots)
    assert "eagle2_kernels.eval.plots" in GRAPH["eagle2_kernels.eval.report"]
    # `from m import name`: an edge to m
    assert "eagle2_kernels.eval.tally" in GRAPH["eagle2_kernels.eval.plots"]
    # relative imports and literal import_module names
    known = {"p", "p.a", "p.a.b", "p.c", "p.d"}
    got = imported_modules("from . import b\nfrom ..c import x\nfrom .. import d\n"
                           "def f():\n    import importlib\n    importlib.import_module('p.c')\n",
                           "p.a.m", False, known)
    assert got == {"p.a.b", "p.c", "p.d", "importlib"}
    assert imported_modules("from .b import y", "p.a", True, known) == {"p.a.b"}


def test_cycle_finder():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    shown = "\n".join(" -> ".join(c) for c in CYCLES)
    assert not CYCLES, f"{len(CYCLES)} import cycle(s) among the package's modules:\n{shown}"


def test_package_does_not_import_entry_folders():
    """bench/ and examples/ sit above the package and import it, never the other way round."""
    known = set(FILES)
    # what the check looks for: absolute names, whatever the import's form
    assert imported_modules("import bench.common\ndef f():\n    from examples import engine\n",
                            "eagle2_kernels.x", False, known) == {"bench.common", "examples"}
    bad = []
    for module, path in FILES.items():
        for name in imported_modules(path.read_text(), module, path.name == "__init__.py", known):
            if name.split(".")[0] in ENTRY_FOLDERS:
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(bad)
