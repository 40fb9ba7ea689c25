"""Listing the inbox (README: File protocol): `scan_inbox` finds every candidate.

It is the full rescan, the safety net for lost events, and what the spool counts
the inbox with. Folders are listed through descriptors opened without following
a symlink, so a scan never leaves the inbox.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from niftidrop.names import Limits, is_candidate, is_hidden

# An entry of a folder listing: name, whether it is a folder, its (device, inode).
_Entry = tuple[str, bool, tuple[int, int] | None]
_LIST_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def scan_inbox(
    folder: Path,
    *,
    recursive: bool,
    accept: Callable[[str], bool] = is_candidate,
    unreachable: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Every candidate under `folder`. Hidden folders (the state folder among them)
    and symlinked folders are not entered; symlinked files are yielded (they are
    refused as unsafe_input, which the user should see).

    Never raises, whatever the tree holds: the walk is a loop, not a recursion;
    each folder is listed through a descriptor opened without following a
    symlink and checked to be the folder its parent listed, so a subfolder
    swapped for a symlink while the scan runs is not listed. A path as long as
    the system's path limit cannot be used by anyone: the file or folder there is
    handed to `unreachable` (folders are not entered) instead of being yielded.
    """
    path_max = Limits.of(folder).path_max
    pending: list[tuple[Path, tuple[int, int] | None]] = [(folder, None)]
    while pending:
        here, identity = pending.pop()
        for name, is_folder, found in _list_folder(here, identity):
            path = here / name
            if len(os.fsencode(path)) >= path_max:  # the limit counts the closing NUL
                if (is_folder or accept(name)) and unreachable is not None:
                    unreachable(path)
            elif is_folder:
                if recursive:
                    pending.append((path, found))
            elif accept(name):
                yield path


def _list_folder(folder: Path, identity: tuple[int, int] | None) -> list[_Entry]:
    """The visible entries of `folder` as (name, is a folder, its (device, inode) if a
    folder); nothing if it cannot be listed, is a symlink, or is no longer the
    folder (`identity`) its parent listed."""
    try:
        descriptor = os.open(folder, _LIST_FLAGS)
    except OSError:
        return []
    try:
        if identity is not None:
            info = os.fstat(descriptor)
            if (info.st_dev, info.st_ino) != identity:
                return []
        found: list[_Entry] = []
        # Everything is read while the descriptor is open: entries of a descriptor's
        # listing stat through it.
        with os.scandir(descriptor) as entries:
            for entry in entries:
                if is_hidden(entry.name):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        found.append((entry.name, True, (info.st_dev, info.st_ino)))
                    else:
                        found.append((entry.name, False, None))
        return found
    except OSError:
        return []
    finally:
        os.close(descriptor)
