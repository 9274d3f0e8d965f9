"""The supervisor's decisions that need no broker: how many processes `auto` means in a container,
how long a dead child waits, and the settings it refuses before starting anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eventhandler.config import load_settings
from eventhandler.cores import available_cores
from eventhandler.processes import count, exit_detail, restart_delay
from eventhandler.supervised import Report, report_path


def cgroup(
    tmp_path: Path, *, v2: str | None = None, v1: tuple[str, str] | None = None, own: str = "/"
) -> Path:
    """A fake /sys/fs/cgroup (and /proc/self/cgroup) with the given CPU limit."""
    root = tmp_path / "cgroup"
    group = root / own.lstrip("/")
    group.mkdir(parents=True)
    if v2 is not None:
        (group / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    (tmp_path / "self").write_text(f"0::{own}\n")
    return root


CORES = len(__import__("os").sched_getaffinity(0))


@pytest.mark.parametrize(
    ("v2", "v1", "own", "expected"),
    [
        ("max 100000", None, "/", CORES),  # no limit: the cores the process may run on
        ("100000 100000", None, "/", 1),  # docker run --cpus 1
        ("150000 100000", None, "/", min(CORES, 2)),  # 1.5 cores keep two processes busy
        ("50000 100000", None, "/kubepods/pod1/c1", 1),  # the process's own group, half a core
        ("6400000 100000", None, "/", CORES),  # a limit above the machine's cores
        (None, ("100000", "100000"), "/", 1),  # cgroup v1
        (None, ("-1", "100000"), "/", CORES),  # cgroup v1 without a quota
        ("garbage", None, "/", CORES),  # unreadable: no limit rather than a crash
        ("max 100000", None, "/../../etc", CORES),  # a path that climbs out is not followed
        (None, None, "/", CORES),  # no cgroup file system at all
    ],
)
def test_auto_is_the_cores_the_container_may_use(
    tmp_path: Path, v2: str | None, v1: tuple[str, str] | None, own: str, expected: int
) -> None:
    root = cgroup(tmp_path, v2=v2, v1=v1, own=own)
    assert available_cores(root, tmp_path / "self") == expected


def test_a_limit_on_a_parent_group_counts_too(tmp_path: Path) -> None:
    """Kubernetes sets the pod's limit on the pod's group; the container's own group says max."""
    root = cgroup(tmp_path, v2="max 100000", own="/kubepods/pod1/c1")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("100000 100000\n")
    (root / "kubepods" / "cpu.max").write_text("max 100000\n")
    assert available_cores(root, tmp_path / "self") == 1


def test_a_signal_without_a_name_is_still_told() -> None:
    assert exit_detail(-9) == {"exit_code": -9, "signal": "SIGKILL"}
    assert exit_detail(-40) == {"exit_code": -40, "signal": "signal 40"}  # a real-time signal
    assert exit_detail(3) == {"exit_code": 3}


def test_a_number_is_taken_as_it_is() -> None:
    assert count(3) == 3
    assert count("auto") == available_cores()


def test_a_child_that_keeps_dying_waits_longer_each_time_up_to_thirty_seconds() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert restart_delay(10_000) == 30  # no overflow after a night of failures


def test_a_report_is_read_whole_or_not_at_all(tmp_path: Path) -> None:
    path = report_path(tmp_path, 0)
    path.parent.mkdir()
    assert Report.read(path) is None
    Report(123, True, {"kafka": "ok", "assigned_partitions": 2}, 1000.0).write(path)
    assert Report.read(path) == Report(123, True, {"kafka": "ok", "assigned_partitions": 2}, 1000.0)
    assert not Report(123, True, {}, 1000.0).fresh(now=1006.0)
    assert Report(123, True, {}, 1000.0).fresh(now=1006.0, seconds=60)
    path.write_text('{"pid": 1, "ready": tr')  # torn or foreign: unknown, not an exception
    assert Report.read(path) is None
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventhandler", "run", *args],
        env={"PATH": "/usr/bin:/bin", "EVENTHANDLER_METRICS_PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_bad_processes_option_is_one_line_and_exit_2() -> None:
    result = _run({}, "--processes", "many")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid --processes: must be a whole number of processes or auto"
    ]


def test_children_that_refuse_their_settings_stop_the_supervisor_with_exit_2() -> None:
    """A handler module that does not import fails every child the same way: the supervisor stops
    instead of restarting them forever."""
    result = _run(
        {"EVENTHANDLER_HANDLERS": "no_such_module_here", "EVENTHANDLER_LOG_FORMAT": "json"},
        "--processes",
        "2",
    )
    assert result.returncode == 2
    assert "EVENTHANDLER_HANDLERS" in result.stderr
    assert "worker_process_refused_its_settings" in result.stdout + result.stderr
    assert "worker_process_started" in result.stdout + result.stderr


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTHANDLER_PROCESSES", " Auto ")
    assert load_settings().processes == "auto"
    monkeypatch.setenv("EVENTHANDLER_PROCESSES", "4")
    assert load_settings().processes == 4
