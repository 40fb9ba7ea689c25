"""What this process may use of the machine: memory and CPUs, cgroup limits included.

A container or a systemd slice often gets far less than the host has; the
defaults that depend on the machine's size (`max_memory`, `workers`,
`compression_threads`) must follow the limits the kernel will enforce, not
`/proc/meminfo`'s total or the host's CPU count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

PROC_MEMINFO: Final = Path("/proc/meminfo")
PROC_CGROUP: Final = Path("/proc/self/cgroup")
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
# Used when nothing can be read (not Linux): conservative, 4 GiB.
FALLBACK_MEMORY_BYTES: Final = 4 * 1024**3
# cgroup v1 reports "no limit" as a huge number near 2**63.
_UNLIMITED_V1: Final = 2**60
# The kernel's default CFS period, for a v2 `cpu.max` that names only its quota.
_DEFAULT_PERIOD_US: Final = 100_000


def total_memory(meminfo: Path = PROC_MEMINFO) -> int | None:
    """The machine's memory in bytes (`MemTotal`), or None if unreadable."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_memory_limit(
    proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT
) -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors (v2
    `memory.max`, v1 `memory.limit_in_bytes`), or None when there is none."""
    limits: list[int | None] = []
    for controllers, path in _cgroups(proc_cgroup):
        if controllers is None:
            folders = _upwards(cgroup_root, path)
            limits += [_memory_limit(folder / "memory.max") for folder in folders]
        elif "memory" in controllers:
            mount = cgroup_root / "memory"
            limits += [
                _memory_limit(folder / "memory.limit_in_bytes") for folder in _upwards(mount, path)
            ]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def cgroup_cpu_limit(
    proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT
) -> int | None:
    """The CPUs that the tightest CPU quota of this process's cgroup and its ancestors
    allows (v2 `cpu.max`, v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`), rounded
    up and at least 1; None when no quota is set."""
    quotas: list[tuple[int, int] | None] = []
    for controllers, path in _cgroups(proc_cgroup):
        if controllers is None:
            quotas += [_v2_cpu_quota(folder) for folder in _upwards(cgroup_root, path)]
        elif "cpu" in controllers:
            # v1 mounts the controller as "cpu,cpuacct" (with a "cpu" symlink) or alone.
            mount = cgroup_root / ",".join(controllers)
            if not mount.is_dir():
                mount = cgroup_root / "cpu"
            quotas += [_v1_cpu_quota(folder) for folder in _upwards(mount, path)]
    cpus = [-(-quota // period) for quota, period in filter(None, quotas)]
    return max(1, min(cpus)) if cpus else None


def affinity_cpus() -> int | None:
    """How many CPUs this process may run on (its affinity mask, which a cpuset or
    `taskset` narrows), or None where the system cannot say."""
    try:
        return len(os.sched_getaffinity(0)) or None
    except (AttributeError, OSError):  # no sched_getaffinity outside Linux
        return None


def available_cpus(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may use: its affinity mask, or its cgroup's CPU quota if
    that is lower; at least 1."""
    allowed = affinity_cpus() or os.cpu_count() or 1
    quota = cgroup_cpu_limit(proc_cgroup, cgroup_root)
    return min(allowed, quota) if quota else allowed


def available_memory() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit if lower."""
    candidates = [size for size in (total_memory(), cgroup_memory_limit()) if size]
    return min(candidates) if candidates else FALLBACK_MEMORY_BYTES


def _cgroups(proc_cgroup: Path) -> Iterator[tuple[list[str] | None, str]]:
    """This process's cgroups from `/proc/self/cgroup`: (the v1 controllers, path) for
    each v1 hierarchy, (None, path) for the v2 one; nothing if unreadable."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not hierarchy:
            continue
        if hierarchy == "0" and controllers == "":
            yield None, path
        else:
            yield controllers.split(","), path


def _upwards(mount: Path, path: str) -> Iterator[Path]:
    """The folders from the cgroup at `path` up to the mount's root (a path that is not
    visible here, inside a cgroup namespace, leads up to the root all the same)."""
    folder = mount / path.lstrip("/")
    while True:
        yield folder
        if folder == mount or mount not in folder.parents:
            return
        folder = folder.parent


def _read(path: Path) -> str:
    """A cgroup file's text, stripped; empty when it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _memory_limit(path: Path) -> int | None:
    """A memory limit file's bytes; None for "max", v1's "unlimited" or no file."""
    text = _read(path)
    return int(text) if text.isdigit() and int(text) < _UNLIMITED_V1 else None


def _v2_cpu_quota(folder: Path) -> tuple[int, int] | None:
    """`cpu.max` ("QUOTA PERIOD" in microseconds) as (quota, period); None for "max"."""
    quota, _, period = _read(folder / "cpu.max").partition(" ")
    return _cpu_quota(quota, period.strip() or str(_DEFAULT_PERIOD_US))


def _v1_cpu_quota(folder: Path) -> tuple[int, int] | None:
    """`cpu.cfs_quota_us` over `cpu.cfs_period_us`; None for -1 (no quota)."""
    return _cpu_quota(_read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us"))


def _cpu_quota(quota: str, period: str) -> tuple[int, int] | None:
    """Quota and period as numbers when both are positive whole numbers, else None."""
    if quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:
        return int(quota), int(period)
    return None
