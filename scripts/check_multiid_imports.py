"""Fail when the modules of pipeline/multiid import one another in a circle (at module level or inside
functions): prints the circle. Run: python scripts/check_multiid_imports.py"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline" / "multiid"


def imports_of(path: Path) -> set[str]:
    """The sibling modules ``path`` imports, anywhere in it (``from pipeline.multiid import x`` included)."""
    siblings = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pipeline.multiid":
                out |= {a.name for a in node.names if a.name in siblings}
            elif node.module.startswith("pipeline.multiid."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("pipeline.multiid.")}
    return out - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def main() -> int:
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    for m in sorted(graph):
        print(f"{m}: {', '.join(sorted(graph[m])) or '-'}")
    cycle = find_cycle(graph)
    if cycle:
        print("import circle: " + " -> ".join(cycle))
        return 1
    print("no import circle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
