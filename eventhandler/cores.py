"""How many cores this process may use: what `EVENTHANDLER_PROCESSES=auto` means in a container."""

from __future__ import annotations

import math
import os
from pathlib import Path


def available_cores(
    cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """The process's CPU affinity, capped by the tightest cgroup CPU quota on its way to the root (a
    container run with `--cpus 2`, or a pod with a CPU limit, sees the host's cores but gets two of
    them). A fractional quota rounds up: 1.5 cores keep two processes busy."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup_root, own_cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota(root: Path, own_cgroup: Path) -> float | None:
    """The smallest quota (in cores) of this process's cgroup and its ancestors, or None."""
    v2 = _quota_v2(root, own_cgroup)
    return v2 if v2 is not None else _quota_v1(root)


def _quota_v2(root: Path, own_cgroup: Path) -> float | None:
    parts: list[str] = []
    try:  # "0::/path" names this process's group in the unified hierarchy
        for line in own_cgroup.read_text(encoding="utf-8").splitlines():
            if line.startswith("0::"):
                parts = [p for p in line[3:].strip().split("/") if p and p != ".."]
    except OSError:
        pass
    quotas = []
    for depth in range(len(parts), -1, -1):  # the group itself, then each parent up to the root
        try:
            limit, period = (
                (root.joinpath(*parts[:depth]) / "cpu.max").read_text(encoding="utf-8").split()[:2]
            )
            if limit != "max":
                quotas.append(int(limit) / int(period))
        except (OSError, ValueError, ZeroDivisionError):
            continue  # not there at this level (a container sees its own group as the root)
    return min(quotas) if quotas else None


def _quota_v1(root: Path) -> float | None:
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
