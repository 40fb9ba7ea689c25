"""What this process may use of the machine: memory, with cgroup limits included.

A container or a systemd slice often gets far less than the host has; the
defaults that depend on the machine's size (`max_memory`) must follow the limit
the kernel will enforce, not `/proc/meminfo`'s total.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

PROC_MEMINFO: Final = Path("/proc/meminfo")
PROC_CGROUP: Final = Path("/proc/self/cgroup")
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
# Used when nothing can be read (not Linux): conservative, 4 GiB.
FALLBACK_MEMORY_BYTES: Final = 4 * 1024**3
# cgroup v1 reports "no limit" as a huge number near 2**63.
_UNLIMITED_V1: Final = 2**60


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
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not hierarchy:
            continue
        if hierarchy == "0" and controllers == "":
            limits += _limits_upwards(cgroup_root, path, "memory.max")
        elif "memory" in controllers.split(","):
            limits += _limits_upwards(cgroup_root / "memory", path, "memory.limit_in_bytes")
    return min(limits) if limits else None


def _limits_upwards(mount: Path, path: str, name: str) -> list[int]:
    """The limits in `name` from the cgroup at `path` up to the mount's root."""
    found = []
    folder = mount / path.lstrip("/")
    while True:
        try:
            text = (folder / name).read_text().strip()
        except OSError:
            text = ""
        if text.isdigit() and int(text) < _UNLIMITED_V1:
            found.append(int(text))
        if folder == mount or mount not in folder.parents:
            return found
        folder = folder.parent


def available_memory() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit if lower."""
    candidates = [size for size in (total_memory(), cgroup_memory_limit()) if size]
    return min(candidates) if candidates else FALLBACK_MEMORY_BYTES
