"""Choosing a watchdog observer for a folder (SPEC §1.10).

inotify reports changes made on this machine; on network and FUSE file systems
(nfs, cifs/smb, fuse, 9p) changes made elsewhere are never reported, so those are
polled. The file system of a folder is read from /proc/self/mountinfo.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

MOUNTINFO: Final = Path("/proc/self/mountinfo")
# File systems whose changes inotify does not (reliably) report: poll them instead.
POLLED_FILE_SYSTEMS: Final = frozenset(
    {"nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "fuse", "fuseblk", "9p"}
)


def file_system_type(path: str | Path, mountinfo: Path = MOUNTINFO) -> str | None:
    """The type of the file system holding `path` (e.g. "ext4", "nfs4"), None if unknown."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:  # not Linux, or /proc not mounted
        return None
    real = os.path.realpath(path)
    best_mount, best_type = "", None
    for line in lines:
        fields = line.split()
        if "-" not in fields[6:-1]:  # fields after "-": type, source, options
            continue
        mount_point = _unescape_mount(fields[4])
        fs_type = fields[fields.index("-", 6) + 1]
        # `>=`: a later mount on the same point hides the earlier one.
        if is_within(real, mount_point) and len(mount_point) >= len(best_mount):
            best_mount, best_type = mount_point, fs_type
    return best_type


def is_within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (both absolute, normalised)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _unescape_mount(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda octal: chr(int(octal.group(1), 8)), field)


def needs_polling(path: str | Path, mountinfo: Path = MOUNTINFO) -> bool:
    """Whether `path` is on a network or FUSE file system, where inotify misses changes."""
    fs_type = file_system_type(path, mountinfo)
    return fs_type is not None and fs_type.split(".")[0] in POLLED_FILE_SYSTEMS


def make_observer(kind: str, poll_interval: float, folders: Iterable[str | Path]) -> BaseObserver:
    """A watchdog observer: `polling`, `inotify` (the native one), or `auto`."""
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    if kind == "polling" or (kind == "auto" and any(needs_polling(f) for f in folders)):
        return PollingObserver(timeout=poll_interval)
    return Observer()
