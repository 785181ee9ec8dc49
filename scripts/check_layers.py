"""Check the package's import graph: no cycles, no stage importing a later one, click only in the CLI.

    .venv/bin/python scripts/check_layers.py

Every import counts, including those inside functions and under TYPE_CHECKING. Exit status 1
(and one line per problem) when a rule is broken. The order of the rooms is LAYERS below.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "mergekit_lite"
# Lower layers first; a module may import its own layer and the ones above it in this list, never a later one.
LAYERS = [
    ("_version", "errors", "sizes", "vocabulary"),
    ("io",),
    ("manifest",),
    ("sources",),
    ("plan",),
    ("merge",),
    ("gate",),
    ("release",),
    ("outcome",),
    ("pipeline", "tools"),
    ("__init__", "cli", "__main__"),
]
ONLY_IMPORTER = {"click": f"{PACKAGE}.cli"}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1 and parts[:-1] != [PACKAGE]:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the package (and third-party top-level names) that `path` imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def layer(module: str) -> int:
    room = module.split(".")[1] if "." in module else "__init__"
    for rank, names in enumerate(LAYERS):
        if room in names:
            return rank
    raise SystemExit(f"{module}: not in LAYERS; add its room there")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def main() -> int:
    root = Path(__file__).resolve().parent.parent / PACKAGE
    known = modules(root)
    known[PACKAGE] = root / "__init__.py"
    problems = []
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        names = imports(path, known)
        graph[module] = {n for n in names if n in known and n != module}
        for target in sorted(graph[module]):
            if layer(target) > layer(module):
                problems.append(f"{module} imports {target}, a later stage")
        for third_party, allowed in ONLY_IMPORTER.items():
            if any(n == third_party or n.startswith(third_party + ".") for n in names) and module != allowed:
                problems.append(f"{module} imports {third_party}; only {allowed} may")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
