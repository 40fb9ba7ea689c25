"""What is on disk, as keys: reference file names, their keys, and the key index.

SPEC §2. A reference's key is its file name without `.nii`/`.nii.gz` (any case),
or the `key` group of `key_pattern`. `ReferenceScanner` finds the references of a
folder tree; `ReferenceIndex` holds them so that every matching rule is a dict
lookup or a bisect, never a walk.
"""

from __future__ import annotations

import os
import re
from bisect import bisect_left, insort
from collections.abc import Iterable
from pathlib import Path
from typing import Final

INPUT_EXTENSIONS: Final = (".npy", ".npz")
REFERENCE_EXTENSIONS: Final = (".nii.gz", ".nii")  # longest first: ".nii.gz" ends in neither


def input_key(name: str) -> str:
    """The key of an input name: its file name without `.npy`/`.npz` (any case)."""
    base = name.rpartition("/")[2]  # not Path(name).name: this runs on every lookup
    lowered = base.lower()
    for extension in INPUT_EXTENSIONS:
        if lowered.endswith(extension):
            return base[: -len(extension)]
    return base


def reference_key(name: str) -> str | None:
    """The key of a reference file name (stem before `.nii`/`.nii.gz`), None if not one."""
    lowered = name.lower()
    for extension in REFERENCE_EXTENSIONS:
        if lowered.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)]
    return None


class ReferenceIndex:
    """Keys → reference paths, and the same keys sorted for prefix searches.

    A key with more than one path is ambiguous. Paths are kept as strings: they
    are half the size of `Path` objects, and lookups turn only the answer into one.
    """

    __slots__ = ("paths_by_key", "size", "sorted_keys")

    def __init__(self, entries: Iterable[tuple[str, str]] = ()) -> None:
        """An index of the (key, path) pairs in `entries`."""
        paths_by_key: dict[str, tuple[str, ...]] = {}
        size = 0
        for key, path in entries:
            existing = paths_by_key.get(key)
            paths_by_key[key] = (path,) if existing is None else (*existing, path)
            size += 1
        self.paths_by_key = paths_by_key
        self.sorted_keys = sorted(paths_by_key)
        self.size = size

    def add(self, key: str, path: str) -> None:
        """Index `path` under `key` (no-op if it already is)."""
        paths = self.paths_by_key.get(key)
        if paths is None:
            self.paths_by_key[key] = (path,)
            insort(self.sorted_keys, key)
        elif path not in paths:
            self.paths_by_key[key] = (*paths, path)
        else:
            return
        self.size += 1

    def discard(self, key: str, path: str) -> None:
        """Forget `path` under `key` (no-op if it is not indexed)."""
        paths = self.paths_by_key.get(key, ())
        if path not in paths:
            return
        remaining = tuple(other for other in paths if other != path)
        if remaining:
            self.paths_by_key[key] = remaining
        else:
            del self.paths_by_key[key]
            del self.sorted_keys[bisect_left(self.sorted_keys, key)]
        self.size -= 1

    def entries_under(self, folder: str) -> list[tuple[str, str]]:
        """Every (key, path) inside `folder`; a scan, used only when a folder goes away."""
        prefix = folder.rstrip(os.sep) + os.sep
        return [
            (key, path)
            for key, paths in self.paths_by_key.items()
            for path in paths
            if path.startswith(prefix)
        ]

    def keys_extending(self, key: str, separators: str) -> list[str]:
        """Keys equal to `key` + separator + at least one more character, sorted."""
        found: list[str] = []
        for separator in separators:
            prefix = key + separator
            position = bisect_left(self.sorted_keys, prefix)
            while position < len(self.sorted_keys):
                candidate = self.sorted_keys[position]
                if not candidate.startswith(prefix):
                    break
                if len(candidate) > len(prefix):
                    found.append(candidate)
                position += 1
        return sorted(found)


class ReferenceScanner:
    """Walks library folders with `os.scandir`, following symlinked folders once."""

    def __init__(self, key_of: ReferenceKeys) -> None:
        self._key_of = key_of
        self._visited: set[tuple[int, int]] = set()
        self.linked: list[str] = []  # symlinked folders scanned, under the path they were found

    def scan(self, folder: str) -> list[tuple[str, str]]:
        """Every (key, path) of a reference below `folder`, skipping hidden names."""
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
            try:
                with os.scandir(current) as entries:
                    for entry in entries:
                        self._visit(entry, found, pending)
            except OSError:  # unreadable or vanished while scanning: the rescan retries
                continue
        return found

    def _visit(
        self,
        entry: os.DirEntry[str],
        found: list[tuple[str, str]],
        pending: list[tuple[str, bool]],
    ) -> None:
        name = entry.name
        if name.startswith("."):
            return
        try:
            key = self._key_of(name)
            if key is not None and entry.is_file():
                found.append((key, entry.path))
            elif entry.is_dir():
                pending.append((entry.path, entry.is_symlink()))
        except OSError:
            return


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
