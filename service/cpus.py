"""How many CPUs this process may use: its affinity (a container's cpuset) and its cgroup's CPU quota (docker's
`--cpus`, compose's `cpus:`, a Kubernetes CPU limit), which affinity alone does not show: a container limited to 2
CPUs on a 64-core host still sees 64 in its affinity, and would size its decode pool and `--frontends auto` for 64."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def machine_threads(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs this process may run on (its affinity), at most its cgroup's CPU quota rounded up."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    return affinity if quota is None else max(1, min(affinity, math.ceil(quota)))


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time per period the quota of this process's cgroup, or of any cgroup above it, allows (the
    smallest); None when there is none or it cannot be read. cgroup v2 (`cpu.max`: "QUOTA PERIOD" or "max PERIOD")
    and v1 (the cpu controller's `cpu.cfs_quota_us`, -1 for none, and `cpu.cfs_period_us`)."""
    try:
        memberships = [line.split(":", 2) for line in proc_cgroup.read_text().splitlines()]
    except OSError:
        return None
    quotas = []
    for membership in memberships:
        if len(membership) != 3:
            continue
        _, controllers, path = membership
        if controllers == "":  # v2: mounted at the root, or at unified/ beside v1 controllers (hybrid)
            quotas += [_smallest(cgroup_root, path, _v2_quota), _smallest(cgroup_root / "unified", path, _v2_quota)]
        elif "cpu" in controllers.split(","):
            quotas.append(_smallest(cgroup_root / controllers, path, _v1_quota))
    return min((quota for quota in quotas if quota is not None), default=None)


def _smallest(root: Path, path: str, read: Callable[[Path], float | None]) -> float | None:
    """The smallest quota `read` finds in `path`'s directory under `root` and in each one above it, up to `root`."""
    quotas = []
    directory = root / path.lstrip("/")
    while True:
        quota = read(directory)
        if quota is not None:
            quotas.append(quota)
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    return min(quotas, default=None)


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
