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


MAX_MODULE_LINES = 400


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = {
        str(path.relative_to(PACKAGE)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_the_engine_never_imports_the_example_domain_or_the_interfaces() -> None:
    """The example (devices, the demo) is what a user replaces, and the CLI and the API are shells
    around the service (the console too): no module below them reaches up into them."""
    shells = ("eventhandler.example", "eventhandler.cli", "eventhandler.api", "eventhandler.console")
    allowed = {
        "eventhandler.__main__": {"eventhandler.cli"},  # `python -m eventhandler` is the CLI
        "eventhandler.handlers.loading": {"eventhandler.example.devices"},  # the built-in projection
    }
    reaching = {
        module: sorted(target for target in targets if target.startswith(shells))
        for module, targets in _imports().items()
        if not module.startswith(shells)
    }
    reaching = {m: [t for t in ts if t not in allowed.get(m, set())] for m, ts in reaching.items()}
    assert {m: ts for m, ts in reaching.items() if ts} == {}
