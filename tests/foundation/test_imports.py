"""The dependency graph of the package: no module-level import cycle, and every module imports on its own.

The graph is read from the source (module-level `import` / `from ... import` statements, plus the parent
packages an import initialises), so a cycle fails here with the modules named, before it fails somewhere
as a half-initialised module. Imports inside functions are not edges: they are reserved for heavy optional
packages, cli.py, and diffusers / torch-pruning in the registries that `safeprune --help` lists (so help
stays fast: `test_the_cli_registries_import_without_diffusers`).
"""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import safeprune
from safeprune.cli import REGISTRY_FLAGS

ROOT = Path(safeprune.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every module under src/safeprune."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["safeprune", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Modules of the package that importing `name` executes first (module-level statements only)."""
    targets = set()
    for node in ast.parse(path.read_text()).body:  # top level only, as the interpreter runs it on import
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets.add(node.module)
            targets |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import submodule`
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c initialises a, a.b, a.b.c
            dotted = ".".join(parts[:i])
            if dotted in modules and dotted != name and not name.startswith(dotted + "."):
                edges.add(dotted)  # a package that encloses `name` is already initialising: no edge
    return edges


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state = {}  # 1 = on the stack, 2 = done
    for start in graph:
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_no_module_level_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert sum(map(len, graph.values())) > len(modules)  # the parser found the graph, not nothing
    assert {"safeprune.data.records", "safeprune.data.shards"} <= graph["safeprune.data.datasets"]
    assert "safeprune.data.datasets" not in graph["safeprune.data.shards"]  # the back-edge records.py removed
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)


def test_the_cli_registries_import_without_diffusers():
    modules = sorted({r.where.split(":")[0] for r in REGISTRY_FLAGS.values()})
    heavy = ("diffusers", "transformers", "torch_pruning", "accelerate")
    code = f"import sys; import {', '.join(modules)}; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"listing the CLI's registries imports {out.strip()}"
