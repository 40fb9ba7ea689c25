"""What is on disk, as keys: reference file names, their keys, and the key index.

See the README, "Reference matching". A reference's key is its file name without
`.nii`/`.nii.gz` (any case), or the `key` group of `key_pattern`.
`ReferenceScanner` finds the references of a folder tree; while it is watched,
`ChangeHandler` queues the names that change and `changes_at` checks them on disk.
`ReferenceIndex` holds the references so that every matching rule is a dict
lookup or a bisect, never a walk.
"""

from __future__ import annotations

import os
import queue
import re
import stat
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Final, NamedTuple

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from niftidrop.names import reference_key
from niftidrop.observers import is_within

# Folder mtimes advance by coarse clock ticks, so a change made just after a listing
# can leave the mtime as it was: only a folder listed this long after its last
# change is trusted to be unchanged while its mtime is.
MTIME_SLACK_NS: Final = 2_000_000_000


class ReferenceIndex:
    """Keys → reference paths, the same keys sorted for prefix searches, and the
    references of each folder (so a folder's changes are found without a scan).

    A key with more than one path is ambiguous. Paths are kept as strings: they
    are half the size of `Path` objects, and lookups turn only the answer into one.
    Only `add` and `discard` change it; read it through its methods and views.
    """

    __slots__ = ("_folder_paths", "_keys_by_folder", "_paths_by_key", "_size", "_sorted_keys")

    def __init__(self, entries: Iterable[tuple[str, str]] = ()) -> None:
        """An index of the (key, path) pairs in `entries`."""
        self._paths_by_key: dict[str, tuple[str, ...]] = {}
        self._keys_by_folder: dict[str, dict[str, str]] = {}  # folder → {path: key}
        self._folder_paths: dict[str, Path] = {}
        self._size = 0
        for key, path in entries:
            self._insert(key, path)
        self._sorted_keys = sorted(self._paths_by_key)  # once: sorting beats an insort per key

    def __contains__(self, key: object) -> bool:
        """Whether some reference has key `key`."""
        return key in self._paths_by_key

    @property
    def size(self) -> int:
        """How many references (paths, not keys) the index holds."""
        return self._size

    @property
    def paths_by_key(self) -> Mapping[str, tuple[str, ...]]:
        """Keys → the paths of their references, as a read-only view."""
        return MappingProxyType(self._paths_by_key)

    @property
    def sorted_keys(self) -> Sequence[str]:
        """Every key, sorted (not to be changed)."""
        return self._sorted_keys

    @property
    def keys_by_folder(self) -> Mapping[str, Mapping[str, str]]:
        """Folder → {path: key} of the references directly in it, as a read-only view."""
        return MappingProxyType(self._keys_by_folder)

    def paths(self, key: str) -> tuple[str, ...]:
        """The paths of the references keyed `key` (more than one: ambiguous); none if absent."""
        return self._paths_by_key.get(key, ())

    def add(self, key: str, path: str) -> None:
        """Index `path` under `key` (no-op if it already is)."""
        if key not in self._paths_by_key:
            insort(self._sorted_keys, key)
        self._insert(key, path)

    def _insert(self, key: str, path: str) -> None:
        """`add`, leaving `_sorted_keys` to the caller."""
        paths = self._paths_by_key.get(key)
        if paths is None:
            self._paths_by_key[key] = (path,)
        elif path not in paths:
            self._paths_by_key[key] = (*paths, path)
        else:
            return
        self._file_in_folder(path, key)
        self._size += 1

    def _file_in_folder(self, path: str, key: str) -> None:
        folder = path.rpartition(os.sep)[0]
        in_folder = self._keys_by_folder.get(folder)
        if in_folder is None:
            self._keys_by_folder[folder] = {path: key}
        else:
            in_folder[path] = key

    def discard(self, key: str, path: str) -> None:
        """Forget `path` under `key` (no-op if it is not indexed)."""
        paths = self._paths_by_key.get(key, ())
        if path not in paths:
            return
        remaining = tuple(other for other in paths if other != path)
        if remaining:
            self._paths_by_key[key] = remaining
        else:
            del self._paths_by_key[key]
            del self._sorted_keys[bisect_left(self._sorted_keys, key)]
        folder = path.rpartition(os.sep)[0]
        in_folder = self._keys_by_folder[folder]
        del in_folder[path]
        if not in_folder:
            del self._keys_by_folder[folder]
        self._size -= 1

    def changes_for_walk(
        self, found: Sequence[tuple[str, str]], listed: Container[str], walked: Container[str]
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The (key, path) removals and additions that bring the index in line with a walk.

        `found` is what the walk found in the folders it listed (`listed`); `walked`
        is every folder it reached, listed or known unchanged. A reference is removed
        when its folder was listed and it was not found, or its folder was not reached;
        one found is added unless its folder holds it already.
        """
        found_paths = {path for _, path in found}
        removals = [
            (key, path)
            for folder, keys in self._keys_by_folder.items()
            if folder in listed or folder not in walked
            for path, key in keys.items()
            if path not in found_paths
        ]
        additions = [
            (key, path)
            for key, path in found
            if path not in self._keys_by_folder.get(path.rpartition(os.sep)[0], ())
        ]
        return removals, additions

    def path(self, path: str) -> Path:
        """`path` as a `Path`, joined onto its folder's cached `Path` (parsing only the
        file name makes a lookup's answer cheaper)."""
        folder, _, name = path.rpartition(os.sep)
        parent = self._folder_paths.get(folder)
        if parent is None:
            parent = self._folder_paths[folder] = Path(folder)
        return parent / name

    def entries_under(self, folder: str) -> list[tuple[str, str]]:
        """Every (key, path) in `folder` and its subfolders."""
        prefix = folder.rstrip(os.sep) + os.sep
        return [
            (key, path)
            for holder, keys in self._keys_by_folder.items()
            if holder == folder or holder.startswith(prefix)
            for path, key in keys.items()
        ]

    def keys_extending(self, key: str, separators: str) -> list[str]:
        """Keys equal to `key` + separator + at least one more character, sorted.

        One bisect per separator finds where such keys start; they follow in a run.
        """
        keys = self._sorted_keys
        found: list[str] = []
        for separator in separators:
            prefix = key + separator
            position = bisect_left(keys, prefix)
            while position < len(keys) and keys[position].startswith(prefix):
                if len(keys[position]) > len(prefix):
                    found.append(keys[position])
                position += 1
        found.sort()
        return found


class FolderSnapshot(NamedTuple):
    """What a walk learnt about one folder, to skip listing it again while unchanged."""

    identity: tuple[int, int]  # st_dev, st_ino
    mtime_ns: int
    listed_ns: int  # wall clock just before it was listed
    subfolders: tuple[tuple[str, bool], ...]  # (path, is a symlink)

    def still_valid(self, identity: tuple[int, int], mtime_ns: int) -> bool:
        """Whether the folder is provably unchanged since it was listed."""
        return (
            identity == self.identity
            and mtime_ns == self.mtime_ns
            and mtime_ns < self.listed_ns - MTIME_SLACK_NS
        )


class ReferenceScanner:
    """Walks library folders with `os.scandir`, following symlinked folders once.

    Given the snapshots of an earlier walk, it lists only folders whose mtime
    changed (adding, removing or renaming an entry changes it) and reuses the rest.
    """

    def __init__(
        self, key_of: ReferenceKeys, previous: Mapping[str, FolderSnapshot] | None = None
    ) -> None:
        self._key_of = key_of
        self._previous = previous or {}
        self._visited: set[tuple[int, int]] = set()
        self.linked: list[str] = []  # symlinked folders walked, under the path they were found
        self.snapshots: dict[str, FolderSnapshot] = {}  # every folder walked
        self.listed: set[str] = set()  # the folders listed again (changed or new)

    def scan(self, folder: str) -> list[tuple[str, str]]:
        """Every (key, path) of a reference in the listed folders below `folder`."""
        found: list[tuple[str, str]] = []
        pending = [(folder, False)]
        while pending:
            current, is_link = pending.pop()
            try:
                status = Path(current).stat()
            except OSError:
                continue
            identity = (status.st_dev, status.st_ino)
            if identity in self._visited:  # a symlink loop, or a folder reached twice
                continue
            self._visited.add(identity)
            if is_link:
                self.linked.append(current)
            previous = self._previous.get(current)
            if previous is not None and previous.still_valid(identity, status.st_mtime_ns):
                self.snapshots[current] = previous
                pending.extend(previous.subfolders)
                continue
            listed_ns = time.time_ns()
            subfolders: list[tuple[str, bool]] = []
            try:
                with os.scandir(current) as entries:
                    for entry in entries:
                        self._visit(entry, found, subfolders)
            except OSError:  # unreadable or vanished while scanning: the rescan retries
                continue
            self.snapshots[current] = FolderSnapshot(
                identity, status.st_mtime_ns, listed_ns, tuple(subfolders)
            )
            self.listed.add(current)
            pending.extend(subfolders)
        return found

    def _visit(
        self,
        entry: os.DirEntry[str],
        found: list[tuple[str, str]],
        subfolders: list[tuple[str, bool]],
    ) -> None:
        name = entry.name
        if name.startswith("."):
            return
        try:
            key = self._key_of(name)
            if key is not None and entry.is_file():
                found.append((key, entry.path))
            elif entry.is_dir():
                subfolders.append((entry.path, entry.is_symlink()))
        except OSError:
            return


# The events that change names, all the index cares about. Asked of the kernel
# alone: by default watchdog also watches opens and closes, so every reference
# the service reads would cost an event handled on three threads.
NAME_EVENTS: Final = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
]


class ChangeHandler(FileSystemEventHandler):
    """Runs on the observer's thread, so it only queues the paths that changed."""

    _RELEVANT: Final = frozenset({"created", "deleted", "moved"})

    def __init__(
        self,
        changes: queue.SimpleQueue[tuple[str, bool] | None],
        key_of: ReferenceKeys,
        *,
        seen_as: tuple[str, str] | None = None,
    ) -> None:
        self._changes = changes
        self._key_of = key_of
        self._seen_as = seen_as  # (real folder, the symlink the index reaches it by)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in self._RELEVANT:
            return  # content changes do not change names, and names are all we index
        paths = [event.src_path]
        if event.event_type == "moved":
            paths.append(event.dest_path)
        for raw in paths:
            path = os.fsdecode(raw)
            if self._seen_as is not None and is_within(path, self._seen_as[0]):
                real, link = self._seen_as
                path = link + path[len(real) :]
            if event.is_directory or self._key_of(Path(path).name) is not None:
                self._changes.put((path, event.is_directory))


def changes_at(
    index: ReferenceIndex,
    key_of: ReferenceKeys,
    changes: Iterable[tuple[str, bool]],
    folders: Sequence[Path],
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The (key, path) removals and additions that bring `index` in line with the disk
    at the paths that changed, given as (path, is a folder), in library `folders`."""
    removals: list[tuple[str, str]] = []
    additions: list[tuple[str, str]] = []
    for path, is_folder in dict.fromkeys(changes):
        if is_folder:
            removals.extend(index.entries_under(path))
            if _in_library(path, folders) and _has_mode(path, stat.S_ISDIR):
                additions.extend(ReferenceScanner(key_of).scan(path))
            continue
        key = key_of(Path(path).name)
        if key is None:
            continue
        if _in_library(path, folders) and _has_mode(path, stat.S_ISREG):
            additions.append((key, path))
        else:
            removals.append((key, path))
    return removals, additions


def _in_library(path: str, folders: Sequence[Path]) -> bool:
    """Whether `path` lies below one of `folders`, with no hidden name on the way."""
    candidate = Path(path)
    for root in folders:
        if candidate.is_relative_to(root):
            parts = candidate.relative_to(root).parts
            return not any(part.startswith(".") for part in parts)
    return False


def _has_mode(path: str, is_kind: Callable[[int], bool]) -> bool:
    """Whether `path` exists and `is_kind` (e.g. `stat.S_ISREG`) holds for it.

    Unlike `Path.is_file()`, any `OSError` (permission denied included) means no:
    the writer thread must survive whatever the disk does.
    """
    try:
        return is_kind(Path(path).stat().st_mode)
    except OSError:
        return False


class ReferenceKeys:
    """A reference file name → its key, or None when the name is not a reference."""

    def __init__(self, pattern: re.Pattern[str] | None) -> None:
        self._pattern = pattern

    def __call__(self, name: str) -> str | None:
        stem = reference_key(name)
        if stem is None or self._pattern is None:
            return stem
        return pattern_key(self._pattern, stem)

    def __repr__(self) -> str:
        pattern = self._pattern.pattern if self._pattern else None
        return f"ReferenceKeys(pattern={pattern!r})"


def pattern_key(pattern: re.Pattern[str], stem: str) -> str | None:
    """The `key` group of `pattern` found in `stem`; None if absent or empty."""
    found = pattern.search(stem)
    return found.group("key") if found is not None and found.group("key") else None
