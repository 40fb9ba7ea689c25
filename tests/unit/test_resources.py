"""Tests of niftidrop.resources: memory limits from /proc and cgroups."""

from __future__ import annotations

from pathlib import Path

from niftidrop.resources import available_memory, cgroup_memory_limit, total_memory


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
