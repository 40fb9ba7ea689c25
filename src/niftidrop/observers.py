"""Choosing a watchdog observer for a folder (README: File protocol), and keeping its watches.

inotify reports changes made on this machine; on network and FUSE file systems
(nfs, cifs/smb, fuse, 9p) changes made elsewhere are never reported, so those are
polled. The file system of a folder is read from /proc/self/mountinfo.
`choose_observer` is that choice for the inbox (whose inotify reader is
niftidrop's own) and for the library (`make_observer`) alike.

A watch is set on a folder, not on a path: when the folder is deleted the watch
ends, when it is renamed away the watch follows it, and a folder made again at
the same path is never watched. `FolderWatches` notices both and sets them again.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers.api import BaseObserver, ObservedWatch

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


def choose_observer(kind: str, *folders: str | Path) -> str:
    """`inotify` or `polling` for `observer = kind` (`auto`: polling when one of
    `folders` is on a network or FUSE file system)."""
    if kind == "auto":
        return "polling" if any(needs_polling(folder) for folder in folders) else "inotify"
    return kind


def make_observer(kind: str, poll_interval: float, folders: Iterable[str | Path]) -> BaseObserver:
    """A watchdog observer: `polling`, `inotify` (the native one), or `auto`."""
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    if choose_observer(kind, *folders) == "polling":
        return PollingObserver(timeout=poll_interval)
    return Observer()


def folder_identity(path: str | Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the folder at `path` (symlinks followed); None if there is none."""
    try:
        status = Path(path).stat()
    except OSError:
        return None
    return (status.st_dev, status.st_ino) if stat.S_ISDIR(status.st_mode) else None


@dataclass
class _Watch:
    watch: ObservedWatch | None  # None: the folder was missing when last tried
    identity: tuple[int, int] | None  # the folder the watch was set on


class FolderWatches:
    """Recursive watches of one started observer, one per folder, each known by the
    path the caller uses for it (a symlink is watched at its target).

    `make_handler(real, path)` gives the handler for the folder `real` that `path`
    leads to. Not thread-safe: the caller serialises calls.
    """

    def __init__(
        self,
        observer: BaseObserver,
        make_handler: Callable[[str, str], FileSystemEventHandler],
        event_filter: list[type[FileSystemEvent]] | None = None,
    ) -> None:
        self._observer = observer
        self._make_handler = make_handler
        self._event_filter = event_filter
        self._watches: dict[str, _Watch] = {}

    def __contains__(self, path: object) -> bool:
        return path in self._watches

    def __repr__(self) -> str:
        return f"FolderWatches({sorted(self._watches)!r})"

    def watch(self, path: str) -> bool:
        """Watch the folder at `path` (again, if it was); False when there is no folder
        there now: it stays listed as lost, to be watched once there is one."""
        self.forget(path)
        identity = folder_identity(path)
        watch = None
        if identity is not None:
            real = os.path.realpath(path)
            with contextlib.suppress(OSError):  # vanished meanwhile: lost, tried again
                watch = self._observer.schedule(
                    self._make_handler(real, path),
                    real,
                    recursive=True,
                    event_filter=self._event_filter,
                )
            if folder_identity(path) != identity:
                identity = None  # replaced while the watch was set: check it again
        self._watches[path] = _Watch(watch, identity)
        return watch is not None and identity is not None

    def forget(self, path: str) -> None:
        """Stop watching `path` (nothing happens if it was not watched)."""
        entry = self._watches.pop(path, None)
        if entry is not None and entry.watch is not None:
            with contextlib.suppress(KeyError, OSError):  # two paths shared one watch
                self._observer.unschedule(entry.watch)

    def lost(self) -> list[str]:
        """The paths whose watch ended (the folder was deleted) or is on another folder
        than the one at the path now (renamed away and replaced, a symlink moved)."""
        live = {
            emitter.watch
            for emitter in list(self._observer.emitters)
            if not emitter.stopped_event.is_set()
        }
        return [
            path
            for path, entry in self._watches.items()
            if entry.watch not in live or folder_identity(path) != entry.identity
        ]

    def renew_lost(self) -> tuple[list[str], bool]:
        """Watch every lost path again where there is a folder now; returns the paths
        watched again, and whether some are still lost."""
        lost = self.lost()
        renewed = [path for path in lost if self.watch(path)]
        return renewed, len(renewed) < len(lost)
