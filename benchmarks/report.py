"""Results: one row per figure, rendered as a plain-text table and optionally written as JSON.

A row carries its own baseline and target so the table reads on its own, and so that the JSON
keeps everything needed to compare two runs.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rich import box
from rich.console import Console
from rich.table import Table

Status = Literal["PASS", "MISS", "N/A", "INFO", "SKIP", "ERROR", "WRONG"]


@dataclass
class Target:
    """`ratio >= minimum` (or `value <= maximum`) is the goal the issue sets for a figure."""

    text: str
    minimum_ratio: float | None = None
    maximum_value: float | None = None

    def judge(self, value: float | None, ratio: float | None) -> Status:
        if self.minimum_ratio is not None:
            if ratio is None:
                return "N/A"  # no baseline in this run (e.g. `--only storm`)
            return "PASS" if ratio >= self.minimum_ratio else "MISS"
        if self.maximum_value is not None:
            if value is None:
                return "N/A"
            return "PASS" if value <= self.maximum_value else "MISS"
        return "INFO"


@dataclass
class Row:
    scenario: str
    figure: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    target: Target | None = None
    note: str = ""
    status: Status = "INFO"
    ratio: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.value is not None and self.baseline:
            self.ratio = self.value / self.baseline
        if self.status == "INFO" and self.target is not None:
            self.status = self.target.judge(self.value, self.ratio)


@dataclass
class Report:
    profile: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how figures were measured, printed under the table
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    seconds: float = 0.0
    crashed: bool = False

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def error(self, scenario: str, exc: BaseException) -> None:
        self.crashed = True
        note = f"{type(exc).__name__}: {exc}"[:200]
        self.add(Row(scenario, "crashed", None, "", note=note, status="ERROR"))

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "started_at": self.started_at,
            "seconds": round(self.seconds, 1),
            "machine": machine(),
            "rows": [asdict(row) for row in self.rows],
            "notes": self.notes,
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    def print(self) -> None:
        """One table on stdout, plain text whatever the terminal (it is pasted into the README)."""
        console = Console(file=sys.stdout, width=200, color_system=None, highlight=False, emoji=False)
        info = machine()
        title = (
            f"eventhandler benchmarks ({self.profile}) — {self.started_at}, {info['cpus']} CPU "
            f"{info['cpu_model']}, Python {info['python']}, {self.seconds:.0f} s"
        )
        table = Table(title=title, box=box.ASCII2, title_justify="left", show_lines=False)
        for name, justify in (
            ("scenario", "left"),
            ("figure", "left"),
            ("value", "right"),
            ("baseline", "right"),
            ("ratio", "right"),
            ("target", "left"),
            ("result", "left"),
            ("note", "left"),
        ):
            table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for row in self.rows:
            baseline = f"{_number(row.baseline)} {row.baseline_label}".strip() if row.baseline else ""
            table.add_row(
                row.scenario,
                row.figure,
                f"{_number(row.value)} {row.unit}".strip() if row.value is not None else "—",
                baseline,
                f"{row.ratio:.2f}x" if row.ratio is not None else "",
                row.target.text if row.target else "",
                row.status,
                row.note,
            )
        console.print(table)
        for text in self.notes:
            console.print(f"- {text}")


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
