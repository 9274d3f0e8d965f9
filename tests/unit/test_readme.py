"""The README against the code: what an operator reads there — every setting with its default and range,
every metric the worker exposes, every module of the layout — is what the code has."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le
from pydantic.fields import FieldInfo

import eventhandler
from eventhandler.config import MAX_PROCESSES, Settings
from eventhandler.metrics import Metrics, SupervisorMetrics

PACKAGE = Path(eventhandler.__file__).parent
README = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")


def section(start: str, end: str) -> str:
    return README[README.index(start) : README.index(end, README.index(start))]


SETTINGS = section("## Settings", "## Developing")
# One row per variable: | `EVENTHANDLER_X` | default (allowed) | meaning |
ROWS = {
    name: default
    for name, default in re.findall(r"^\| `(EVENTHANDLER_[A-Z_]+)` \| ([^|]*) \|", SETTINGS, re.MULTILINE)
}


def test_every_setting_is_in_the_settings_table() -> None:
    named = set(re.findall(r"`(EVENTHANDLER_[A-Z_]+)`", SETTINGS))
    missing = [f"EVENTHANDLER_{field.upper()}" for field in Settings.model_fields]
    assert [name for name in missing if name not in named] == []
    assert sorted(named - set(missing)) == [], "the table names a setting the code does not have"


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _bounds(field: FieldInfo) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for rule in field.metadata:
        if isinstance(rule, Ge):
            found["ge"] = rule.ge
        elif isinstance(rule, Gt):
            found["gt"] = rule.gt
        elif isinstance(rule, Le):
            found["le"] = rule.le
    return found


NUMERIC = [
    name
    for name, info in Settings.model_fields.items()
    if isinstance(info.default, int | float) and not isinstance(info.default, bool)
]


@pytest.mark.parametrize("field", NUMERIC)
def test_a_numeric_setting_has_its_default_and_range_in_the_table(field: str) -> None:
    info = Settings.model_fields[field]
    cell = ROWS[f"EVENTHANDLER_{field.upper()}"]
    default = re.match(r"`([\d.,]+)`", cell)
    assert default is not None, cell
    assert _number(default.group(1)) == info.default
    shown: dict[str, Any] = {}
    span = re.search(r"\(([\d,]+)\N{EN DASH}([\d,]+)", cell)
    if span is not None:
        shown = {"ge": _number(span.group(1)), "le": _number(span.group(2))}
    else:
        if re.search(r"> 0", cell):
            shown["gt"] = 0
        if (most := re.search(r"≤ ([\d,]+)", cell)) is not None:
            shown["le"] = _number(most.group(1))
    expected = _bounds(info) if field != "processes" else {"ge": 1, "le": MAX_PROCESSES}
    assert shown == expected, cell


def test_every_metric_of_the_worker_and_the_supervisor_is_in_the_metrics_table(tmp_path: Path) -> None:
    table = section("### Metrics and alerts", "## Settings")
    supervisor = SupervisorMetrics(tmp_path, lambda: (True, {}), lambda: 1)
    exposed = {
        metric.name + ("_total" if metric.type == "counter" else "")
        for registry in (Metrics().registry, supervisor.registry)
        for metric in registry.collect()
    }
    assert sorted(name for name in exposed if f"`{name}" not in table) == []


def test_every_module_is_in_the_layout() -> None:
    layout = section("- **Layout**", "- **Adding a handler**")
    modules = [
        path.relative_to(PACKAGE)
        for path in PACKAGE.rglob("*.py")
        if path.stem != "__init__" and not {"example", "local"} & set(path.parts)
    ]
    assert modules  # the walk found the package
    missing = [
        str(m) for m in modules if f"`{m.stem}`" not in layout and f"`{m.parent}/{m.stem}`" not in layout
    ]
    assert sorted(missing) == []
