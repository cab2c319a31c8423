"""The suite runs one pytest-xdist worker per core it may use: a cgroup CPU quota counts, not the host's cores."""

from __future__ import annotations

import os

import pytest

from tests.conftest import available_cores


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, docker --cpus 1.5
    ({"cpu.max": "max 100000\n", "ci/job/cpu.max": "100000 100000\n"}, 1),  # v2, a quota on this process's cgroup
    ({"cpu.max": "max 100000\n"}, 8),  # v2 without a quota
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1, --cpus 3
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),  # v1 without a quota
    ({}, 8),  # no cgroup files
])
def test_a_cgroup_quota_caps_the_cores_the_suite_uses(tmp_path, monkeypatch, files, cores):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # a host of 8 cores
    for name, text in files.items():
        (tmp_path / "cgroup" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cgroup" / name).write_text(text)
    (tmp_path / "membership").write_text("12:cpu,cpuacct:/\n0::/ci/job\n")
    assert available_cores(tmp_path / "cgroup", tmp_path / "membership") == cores
