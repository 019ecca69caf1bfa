"""The import graph of a package, and its cycles: ``python tools/import_graph.py [src/tunelab] [--max 2]``.

Reads the sources with ``ast`` (imports nothing), so it is dependency-free and fast. An edge A -> B is an
``import B`` / ``from B import x`` in A, resolved to the most specific module of the package it names
(``from tunelab.methods import io`` -> ``tunelab.methods.io``); importing a submodule is not counted as
importing its parent package (as in import-linter / grimp). Imports under ``if TYPE_CHECKING:`` never run
and are left out. Two graphs are built: module-level imports only (what runs when a module loads), and
all imports (function-level ones too, which run when the function is first called).

Exit status 1 when a strongly connected component of the module-level graph has more than ``--max``
modules (``--all`` applies the limit to the graph with function-level imports too); each component is
printed with the edges that close it, so the fix is readable from the output.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    lazy: bool  # inside a function body (runs on first call), not at module level
    line: int


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every module under ``root`` (the package directory; __init__.py optional)."""
    package = root.name
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((package, *parts))] = path
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that can run, with whether it sits inside a function."""
    def walk(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child.test):
                for other in child.orelse:
                    yield from walk(other, lazy)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, lazy
            yield from walk(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))
    yield from walk(tree, False)


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> Iterable[str]:
    if isinstance(node, ast.Import):
        return [t for t in (_resolve(alias.name, known) for alias in node.names) if t]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
    found = []
    for alias in node.names:
        target = _resolve(f"{base}.{alias.name}", known)  # `from pkg import submodule`
        if target is None or target == _resolve(base, known) and f"{base}.{alias.name}" not in known:
            target = _resolve(base, known)
        if target:
            found.append(target)
    return found


def _by_name(tree: ast.Module, package: str, known: set[str]) -> Iterator[tuple[str, int]]:
    """Modules named in a string such as ``"tunelab.models:DTYPES"`` (imported later by ``importlib``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = re.fullmatch(rf"({re.escape(package)}(?:\.\w+)*):\w+", node.value)
            if match and match.group(1) in known:
                yield match.group(1), node.lineno


def edges(root: Path) -> list[Edge]:
    """The package's import edges between its own modules (self-imports and repeats dropped). A module named
    by string (``"pkg.mod:NAME"``, imported on use) counts as a function-level import."""
    found = modules(root)
    known = set(found)
    out: dict[tuple[str, str, int], Edge] = {}
    for module, path in found.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, lazy in _imports(tree):
            for target in _targets(node, module, path.name == "__init__.py", known):
                out.setdefault((module, target, node.lineno), Edge(module, target, lazy, node.lineno))
        for target, line in _by_name(tree, root.name, known):
            out.setdefault((module, target, line), Edge(module, target, True, line))
    return [e for e in out.values() if e.source != e.target]


def components(nodes: Iterable[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result = []
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node:
                        break
                if len(members) > 1:
                    result.append(sorted(members))
    return sorted(result, key=lambda c: (-len(c), c))


def graph_of(all_edges: list[Edge], lazy: bool) -> dict[str, set[str]]:
    """Adjacency sets; function-level edges included only when ``lazy``."""
    graph: dict[str, set[str]] = {}
    for edge in all_edges:
        if lazy or not edge.lazy:
            graph.setdefault(edge.source, set()).add(edge.target)
    return graph


def report(name: str, comps: list[list[str]], all_edges: list[Edge], lazy: bool) -> str:
    lines = [f"{name}: {len(comps)} cycle(s); sizes {[len(c) for c in comps] or '-'}"]
    for comp in comps:
        members = set(comp)
        lines.append(f"  {len(comp)} modules: {', '.join(comp)}")
        for e in all_edges:
            if e.source in members and e.target in members and (lazy or not e.lazy):
                lines.append(f"    {e.source}:{e.line} -> {e.target}{' (in a function)' if e.lazy else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default="src/tunelab", type=Path)
    parser.add_argument("--max", type=int, default=2, help="largest cycle allowed, in modules")
    parser.add_argument("--all", action="store_true", help="apply --max to function-level imports too")
    args = parser.parse_args(argv)
    all_edges = edges(args.package)
    nodes = modules(args.package)
    top = components(nodes, graph_of(all_edges, lazy=False))
    every = components(nodes, graph_of(all_edges, lazy=True))
    lazy_count = sum(e.lazy for e in all_edges)
    print(f"{len(nodes)} modules, {len(all_edges) - lazy_count} module-level and {lazy_count} function-level imports")
    print(report("module-level imports", top, all_edges, lazy=False))
    print(report("all imports (function-level too)", every, all_edges, lazy=True))
    worst = max((len(c) for c in (every if args.all else top)), default=0)
    if worst > args.max:
        print(f"FAIL: a cycle of {worst} modules (at most {args.max} allowed)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
