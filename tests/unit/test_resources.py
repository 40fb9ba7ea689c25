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


class TestCgroupCpuLimit:
    def test_v2_quota_rounded_up(self, tmp_path: Path) -> None:
        """cgroup v2: cpu.max "150000 100000" (1.5 CPUs) allows 2 CPUs."""
        root = tmp_path / "cgroup"
        _write(root / "svc" / "cpu.max", "150000 100000\n")
        proc = _write(tmp_path / "self-cgroup", "0::/svc\n")
        assert cgroup_cpu_limit(proc, root) == 2

    def test_v2_tightest_of_ancestors(self, tmp_path: Path) -> None:
        """cgroup v2: the lowest quota on the way up wins; "max" is no quota."""
        root = tmp_path / "cgroup"
        _write(root / "slice" / "cpu.max", "200000 100000\n")
        _write(root / "slice" / "svc" / "cpu.max", "max 100000\n")
        proc = _write(tmp_path / "self-cgroup", "0::/slice/svc\n")
        assert cgroup_cpu_limit(proc, root) == 2

    def test_v2_max_everywhere_is_no_limit(self, tmp_path: Path) -> None:
        """cgroup v2 with "max" at every level: None."""
        root = tmp_path / "cgroup"
        _write(root / "svc" / "cpu.max", "max 100000\n")
        proc = _write(tmp_path / "self-cgroup", "0::/svc\n")
        assert cgroup_cpu_limit(proc, root) is None

    def test_a_fraction_of_a_cpu_is_one(self, tmp_path: Path) -> None:
        """A quota below one CPU (docker --cpus 0.25) still allows 1."""
        root = tmp_path / "cgroup"
        _write(root / "cpu.max", "25000 100000\n")
        proc = _write(tmp_path / "self-cgroup", "0::/\n")
        assert cgroup_cpu_limit(proc, root) == 1

    def test_v1_cpu_and_cpuacct(self, tmp_path: Path) -> None:
        """cgroup v1: cpu.cfs_quota_us over cpu.cfs_period_us in the "cpu,cpuacct"
        hierarchy; the root's -1 is no quota."""
        mount = tmp_path / "cgroup" / "cpu,cpuacct"
        _write(mount / "cpu.cfs_quota_us", "-1\n")
        _write(mount / "cpu.cfs_period_us", "100000\n")
        _write(mount / "docker" / "cpu.cfs_quota_us", "300000\n")
        _write(mount / "docker" / "cpu.cfs_period_us", "100000\n")
        proc = _write(tmp_path / "self-cgroup", "5:cpu,cpuacct:/docker\n4:memory:/docker\n")
        assert cgroup_cpu_limit(proc, tmp_path / "cgroup") == 3

    def test_v1_cpu_mounted_alone(self, tmp_path: Path) -> None:
        """cgroup v1 with the cpu controller in a hierarchy of its own ("cpu")."""
        mount = tmp_path / "cgroup" / "cpu"
        _write(mount / "cpu.cfs_quota_us", "50000\n")
        _write(mount / "cpu.cfs_period_us", "10000\n")
        proc = _write(tmp_path / "self-cgroup", "1:cpu:/\n2:cpuacct:/\n")
        assert cgroup_cpu_limit(proc, tmp_path / "cgroup") == 5

    def test_v1_no_quota(self, tmp_path: Path) -> None:
        """cgroup v1 with cpu.cfs_quota_us -1 everywhere: None."""
        mount = tmp_path / "cgroup" / "cpu"
        _write(mount / "app" / "cpu.cfs_quota_us", "-1\n")
        _write(mount / "app" / "cpu.cfs_period_us", "100000\n")
        proc = _write(tmp_path / "self-cgroup", "1:cpu:/app\n")
        assert cgroup_cpu_limit(proc, tmp_path / "cgroup") is None

    @pytest.mark.parametrize("line", ["0::/svc\n", "3:cpu,cpuacct:/svc\n"])
    def test_missing_files_are_no_limit(self, tmp_path: Path, line: str) -> None:
        """A cgroup whose CPU files are not there (controller not enabled): None."""
        (tmp_path / "cgroup" / "svc").mkdir(parents=True)
        proc = _write(tmp_path / "self-cgroup", line)
        assert cgroup_cpu_limit(proc, tmp_path / "cgroup") is None

    def test_no_proc_file(self, tmp_path: Path) -> None:
        """No /proc/self/cgroup (not Linux): None."""
        assert cgroup_cpu_limit(tmp_path / "missing", tmp_path) is None


class TestAvailableCpus:
    def test_quota_below_affinity_wins(self, tmp_path: Path) -> None:
        """A cgroup quota of 1 CPU gives 1, whatever the affinity allows."""
        root = tmp_path / "cgroup"
        _write(root / "cpu.max", "100000 100000\n")
        proc = _write(tmp_path / "self-cgroup", "0::/\n")
        assert available_cpus(proc, root) == 1

    def test_quota_above_affinity_is_the_affinity(self, tmp_path: Path) -> None:
        """A quota of more CPUs than the process may run on gives the affinity's count."""
        root = tmp_path / "cgroup"
        _write(root / "cpu.max", "100000000 100000\n")
        proc = _write(tmp_path / "self-cgroup", "0::/\n")
        assert available_cpus(proc, root) == len(os.sched_getaffinity(0))

    def test_no_cgroup_is_the_affinity(self, tmp_path: Path) -> None:
        """Without cgroup files the affinity mask alone counts."""
        assert available_cpus(tmp_path / "missing", tmp_path) == affinity_cpus()
