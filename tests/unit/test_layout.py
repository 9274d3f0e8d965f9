"""The package's shape: no module imports itself back through another (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import eventhandler

PACKAGE = Path(eventhandler.__file__).parent


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = {
            node.module
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eventhandler")
        }
    return found


def test_there_is_no_import_cycle() -> None:
    imports = _imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for target in imports.get(todo.pop(), ()):
                if target == goal:
                    return True
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return False

    cycles = sorted(
        {tuple(sorted((a, b))) for a, targets in imports.items() for b in targets if reaches(b, a)}
    )
    assert cycles == []
