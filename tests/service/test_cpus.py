"""service.cpus: the CPUs a process may use are its affinity, capped by its cgroup's CPU quota (v2 or v1, its own
cgroup's or a parent's), read from a cgroup tree made here."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from service.cpus import cgroup_cpu_quota, machine_threads

AFFINITY = len(os.sched_getaffinity(0))


def tree(root: Path, proc_cgroup: str, files: dict[str, str]) -> Path:
    """A cgroup mount under `root` holding `files` (path -> content), and the /proc/self/cgroup naming the process's
    cgroups; returns that /proc file."""
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(content)
    membership = root / "proc-self-cgroup"
    membership.write_text(proc_cgroup)
    return membership


V1_C1 = "cpu,cpuacct/docker/c1/"
CASES = {  # id: (/proc/self/cgroup, the cgroup files, the quota in CPUs)
    "v2": ("0::/pod/app\n", {"pod/app/cpu.max": "150000 100000"}, 1.5),
    "v2-parent": ("0::/pod/app\n", {"pod/app/cpu.max": "max 100000", "pod/cpu.max": "200000 100000"}, 2.0),
    "v2-unlimited": ("0::/\n", {"cpu.max": "max 100000"}, None),
    "v1": (
        "4:memory:/x\n1:cpu,cpuacct:/docker/c1\n0::/\n",
        {V1_C1 + "cpu.cfs_quota_us": "300000", V1_C1 + "cpu.cfs_period_us": "100000"},
        3.0,
    ),
    "v1-unlimited": ("1:cpu:/\n0::/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    "hybrid-smallest": (
        "0::/a\n1:cpu:/a\n",
        {"unified/a/cpu.max": "50000 100000", "cpu/a/cpu.cfs_quota_us": "400000", "cpu/a/cpu.cfs_period_us": "100000"},
        0.5,
    ),
    "unreadable": ("0::/gone\n", {}, None),
}


@pytest.mark.parametrize("proc_cgroup, files, quota", CASES.values(), ids=CASES.keys())
def test_the_quota_is_the_smallest_of_the_cgroup_and_its_parents(tmp_path, proc_cgroup, files, quota):
    membership = tree(tmp_path, proc_cgroup, files)
    assert cgroup_cpu_quota(tmp_path, membership) == quota
    expected = AFFINITY if quota is None else max(1, min(AFFINITY, math.ceil(quota)))
    assert machine_threads(tmp_path, membership) == expected


def test_without_a_cgroup_file_the_affinity_counts(tmp_path):
    assert machine_threads(tmp_path, tmp_path / "missing") == AFFINITY
