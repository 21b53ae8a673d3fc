"""No import cycles among the ``diffgr2_trl`` modules, and the library never imports the top-level ``rewards``.

The graph is built from the source with ``ast``: every ``import`` / ``from ... import`` statement, at module level or
inside a function, is an edge; importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` (unless the importer lives
in that package already), so that is an edge too. A cycle is reported with the modules on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = "diffgr2_trl"


def module_files(root: Path = REPO / PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package (``pkg.__init__`` is ``pkg``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_names(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module (of any package) ``module`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # `from pkg import submodule`
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: the diffgr2_trl modules it makes Python execute}``."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own = set(_ancestors(name)) | {name}
        edges = set()
        for target in imported_names(name, path, modules):
            for t in [*_ancestors(target), target]:
                if t in modules and t not in own:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_function_level_imports(tmp_path):
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    modules = module_files(pkg)
    graph = {n: {t for t in imported_names(n, p, modules) if t in modules and t != "toy"} for n, p in modules.items()}
    assert find_cycle(graph) == ["toy.a", "toy.b", "toy.a"]


def test_no_import_cycles_in_diffgr2_trl():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_rewards():
    graph_sources = {n: imported_names(n, p, module_files()) for n, p in module_files().items()}
    offenders = sorted(n for n, names in graph_sources.items() if any(x == "rewards" or x.startswith("rewards.")
                                                                     for x in names))
    assert not offenders, f"diffgr2_trl modules importing the top-level rewards package: {offenders}"


def test_no_import_cycles_between_subpackages():
    """Layering one level up: e.g. ``pipeline`` calls ``commands``' run functions, so ``commands`` (the ``pipeline``
    subcommand included, which lives in ``pipeline/command.py``) must never import ``pipeline``."""
    depth = len(PACKAGE.split(".")) + 1

    def package_of(module: str) -> str:
        return ".".join(module.split(".")[:depth])

    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        src = package_of(module)
        packages.setdefault(src, set()).update(package_of(t) for t in targets if package_of(t) != src)
    cycle = find_cycle(packages)
    assert cycle is None, "subpackage import cycle: " + " -> ".join(cycle)
