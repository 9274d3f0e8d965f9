"""The README against the code: what an operator reads there — every setting with its default and allowed
values, every metric the worker and the supervisor expose, every module of the layout — is what the code has."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic import SecretStr
from pydantic.fields import FieldInfo

import eventhandler
from eventhandler.config import MAX_PROCESSES, Settings
from eventhandler.metrics import Metrics, SupervisorMetrics

PACKAGE = Path(eventhandler.__file__).parent
README = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")


def section(start: str, end: str) -> str:
    return README[README.index(start) : README.index(end, README.index(start))]


# One row per variable: | `EVENTHANDLER_X` | default (allowed) | meaning |
ROWS = re.findall(
    r"^\| `(EVENTHANDLER_[A-Z_]+)` \| ([^|]*) \| ([^\n]*) \|$",
    section("## Settings", "## Developing"),
    re.MULTILINE,
)
CELLS = {name: (default.strip(), meaning) for name, default, meaning in ROWS}


def test_every_setting_has_one_row_and_every_row_is_a_setting() -> None:
    names = [name for name, _, _ in ROWS]
    assert len(names) == len(set(names)), "a setting has two rows"
    assert sorted(names) == sorted(f"EVENTHANDLER_{field.upper()}" for field in Settings.model_fields)


def _shown(default: Any) -> str | None:
    """How the table shows a default value (None: in words, such as "unset")."""
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    if default is None:
        return None
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, list):
        return f"`{','.join(default)}`" if default else "empty"
    if isinstance(default, dict):
        return "`{}`" if not default else None
    return f"`{default}`" if isinstance(default, str) else None


@pytest.mark.parametrize("field", list(Settings.model_fields))
def test_a_setting_shows_its_default_and_allowed_values(field: str) -> None:
    info = Settings.model_fields[field]
    default = info.get_default(call_default_factory=True)
    cell, meaning = CELLS[f"EVENTHANDLER_{field.upper()}"]
    if isinstance(default, int | float) and not isinstance(default, bool):
        number = re.match(r"`([\d.,]+)`", cell)
        assert number is not None, cell
        assert _number(number.group(1)) == default
        expected = {"ge": 1, "le": MAX_PROCESSES} if field == "processes" else _bounds(info)
        assert _shown_bounds(cell) == expected, cell
    elif (shown := _shown(default)) is not None:
        assert cell == shown
    else:
        assert not cell.startswith("`"), f"{cell}: a value, where the default is {default!r}"
    for value in _choices(info):
        assert f"`{value}`" in cell + meaning, f"{value} is an allowed value"


def _choices(info: FieldInfo) -> list[str]:
    """The values of a `Literal` setting (`auto` of `int | Literal["auto"]` too)."""
    annotation = info.annotation
    kinds = (annotation,) if typing.get_origin(annotation) is typing.Literal else typing.get_args(annotation)
    return [
        str(v) for kind in kinds if typing.get_origin(kind) is typing.Literal for v in typing.get_args(kind)
    ]


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _bounds(field: FieldInfo) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for rule in field.metadata:
        for kind, name in ((Ge, "ge"), (Gt, "gt"), (Le, "le"), (Lt, "lt")):
            if isinstance(rule, kind):
                found[name] = getattr(rule, name)
    return found


DASH = "\N{EN DASH}"


def _shown_bounds(cell: str) -> dict[str, float]:
    """A range (`(1` en dash `100)`) or signed bounds (`(> 0, ≤ 60)`) of a default cell."""
    number = r"([\d.,]*\d)"
    span = re.search(rf"\({number}{DASH}{number}", cell)
    if span is not None:
        return {"ge": _number(span.group(1)), "le": _number(span.group(2))}
    signs = {">": "gt", "≥": "ge", "<": "lt", "≤": "le"}
    return {signs[sign]: _number(value) for sign, value in re.findall(rf"([>≥<≤]) {number}", cell)}


def test_the_metrics_table_names_exactly_the_metrics_of_the_worker_and_the_supervisor(tmp_path: Path) -> None:
    table = section("### Metrics and alerts", "## Settings")
    suffix = {"counter": "_total", "info": "_info"}
    supervisor = SupervisorMetrics(tmp_path, lambda: (True, {}), lambda: 1)
    exposed = {
        metric.name + suffix.get(metric.type, "")
        for registry in (Metrics().registry, supervisor.registry)
        for metric in registry.collect()
    }
    named = set(re.findall(r"`(eventhandler_[a-z_]+)", table))
    assert sorted(exposed - named) == [], "not in the README"
    assert sorted(named - exposed) == [], "in the README, not in the code"


def test_every_module_is_in_the_layout() -> None:
    # The layout is a list of items; a module of a package is named in the item that names the
    # package (`cli/` (`dlq`, `edit`, …)) or as `package/module` anywhere.
    items = section("- **Layout**", "- **Adding a handler**").split("\n  - ")
    modules = [
        path.relative_to(PACKAGE)
        for path in PACKAGE.rglob("*.py")
        if path.stem != "__init__" and not {"example", "local"} & set(path.parts)
    ]
    assert len(modules) > 40  # the walk found the package

    def named(module: Path) -> bool:
        if len(module.parts) == 1:
            return any(f"`{module.stem}`" in item for item in items)
        package = module.parts[0]
        return any(f"`{module.parent}/{module.stem}`" in item for item in items) or any(
            f"`{package}/`" in item and f"`{module.stem}`" in item for item in items
        )

    assert sorted(str(m) for m in modules if not named(m)) == []
