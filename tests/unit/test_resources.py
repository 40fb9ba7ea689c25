"""Tests of niftidrop.resources: memory and CPU limits from /proc and cgroups."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from niftidrop.resources import (
    affinity_cpus,
    available_cpus,
    available_memory,
    cgroup_cpu_limit,
    cgroup_memory_limit,
    total_memory,
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class TestTotalMemory:
    def test_reads_memtotal(self, tmp_path: Path) -> None:
        """MemTotal is reported in KiB and returned in bytes."""
        meminfo = _write(tmp_path / "meminfo", "MemTotal:       2048 kB\nMemFree: 1 kB\n")
        assert total_memory(meminfo) == 2048 * 1024

    def test_unreadable_is_none(self, tmp_path: Path) -> None:
        """A missing file gives None rather than an exception."""
        assert total_memory(tmp_path / "missing") is None


class TestCgroupLimit:
    def test_v2_tightest_of_ancestors(self, tmp_path: Path) -> None:
        """cgroup v2: the lowest memory.max on the way up to the root wins."""
        root = tmp_path / "cgroup"
        _write(root / "memory.max", "max\n")
        _write(root / "slice" / "memory.max", "1000000\n")
        _write(root / "slice" / "svc" / "memory.max", "max\n")
        proc = _write(tmp_path / "self-cgroup", "0::/slice/svc\n")
        assert cgroup_memory_limit(proc, root) == 1_000_000

    def test_v1_memory_controller(self, tmp_path: Path) -> None:
        """cgroup v1: memory.limit_in_bytes of the memory hierarchy; 'unlimited' ignored."""
        root = tmp_path / "cgroup"
        _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
        _write(root / "memory" / "docker" / "memory.limit_in_bytes", "536870912\n")
        proc = _write(tmp_path / "self-cgroup", "4:memory:/docker\n3:cpu:/docker\n")
        assert cgroup_memory_limit(proc, root) == 536_870_912

    def test_namespaced_path_missing_falls_back_to_root(self, tmp_path: Path) -> None:
        """A cgroup path that is not visible (a cgroup namespace) reads the mount's root."""
        root = tmp_path / "cgroup"
        _write(root / "memory.max", "2000000\n")
        proc = _write(tmp_path / "self-cgroup", "0::/not/visible/here\n")
        assert cgroup_memory_limit(proc, root) == 2_000_000

    def test_no_limit(self, tmp_path: Path) -> None:
        """No memory controller line and no file: None."""
        proc = _write(tmp_path / "self-cgroup", "1:cpu:/\n")
        assert cgroup_memory_limit(proc, tmp_path / "cgroup") is None


def test_available_memory_is_positive() -> None:
    """On this machine something sensible comes out."""
    assert available_memory() > 0


def _cgroups(tmp_path: Path, files: dict[str, str], cgroups: str) -> tuple[Path, Path]:
    """A cgroup mount with `files` (relative path -> content) and a /proc/self/cgroup
    with the lines `cgroups` ("0::/svc"; several separated by spaces)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for relative, text in files.items():
        _write(root / relative, text + "\n")
    return _write(tmp_path / "self-cgroup", cgroups.replace(" ", "\n") + "\n"), root


# Cgroup layouts and the CPUs their quotas allow (None: no quota).
CPU_QUOTAS: dict[str, tuple[dict[str, str], str, int | None]] = {
    "v2 1.5 CPUs round up": ({"svc/cpu.max": "150000 100000"}, "0::/svc", 2),
    "v2 tightest ancestor": (
        {"slice/cpu.max": "200000 100000", "slice/svc/cpu.max": "max 100000"},
        "0::/slice/svc",
        2,
    ),
    "v2 max everywhere": ({"svc/cpu.max": "max 100000"}, "0::/svc", None),
    "v2 quota alone": ({"cpu.max": "300000"}, "0::/", 3),
    "v2 a quarter CPU is one": ({"cpu.max": "25000 100000"}, "0::/", 1),
    "v2 missing files": ({"svc/cgroup.procs": ""}, "0::/svc", None),
    "v1 cpu,cpuacct": (
        {
            "cpu,cpuacct/cpu.cfs_quota_us": "-1",
            "cpu,cpuacct/cpu.cfs_period_us": "100000",
            "cpu,cpuacct/docker/cpu.cfs_quota_us": "300000",
            "cpu,cpuacct/docker/cpu.cfs_period_us": "100000",
        },
        "5:cpu,cpuacct:/docker 4:memory:/docker",
        3,
    ),
    "v1 cpu alone": (
        {"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "10000"},
        "1:cpu:/ 2:cpuacct:/",
        5,
    ),
    "v1 quota -1": (
        {"cpu/app/cpu.cfs_quota_us": "-1", "cpu/app/cpu.cfs_period_us": "100000"},
        "1:cpu:/app",
        None,
    ),
    "v1 missing files": ({"cpu,cpuacct/svc/tasks": ""}, "3:cpu,cpuacct:/svc", None),
    "no cpu controller": ({}, "4:memory:/", None),
}


class TestCgroupCpuLimit:
    @pytest.mark.parametrize(
        ("files", "cgroups", "cpus"), list(CPU_QUOTAS.values()), ids=list(CPU_QUOTAS)
    )
    def test_quotas(
        self, tmp_path: Path, files: dict[str, str], cgroups: str, cpus: int | None
    ) -> None:
        """v2 `cpu.max` and v1 CFS quotas, up the hierarchy: the tightest wins, rounded
        up, at least 1; "max", -1 and missing files are no quota."""
        assert cgroup_cpu_limit(*_cgroups(tmp_path, files, cgroups)) == cpus

    def test_no_proc_file(self, tmp_path: Path) -> None:
        """No /proc/self/cgroup (not Linux): None."""
        assert cgroup_cpu_limit(tmp_path / "missing", tmp_path) is None


class TestAvailableCpus:
    @pytest.mark.parametrize(("quota", "expected"), [("100000 100000", 1), ("max 100000", None)])
    def test_the_fewest_of_quota_and_affinity(
        self, tmp_path: Path, quota: str, expected: int | None
    ) -> None:
        """A quota of 1 CPU gives 1; without a quota the affinity mask counts."""
        found = available_cpus(*_cgroups(tmp_path, {"cpu.max": quota}, "0::/"))
        assert found == (expected or len(os.sched_getaffinity(0)))

    def test_a_quota_above_the_affinity_is_the_affinity(self, tmp_path: Path) -> None:
        """A quota of more CPUs than the process may run on gives the affinity's count."""
        found = available_cpus(*_cgroups(tmp_path, {"cpu.max": "100000000 100000"}, "0::/"))
        assert found == affinity_cpus() == len(os.sched_getaffinity(0))
