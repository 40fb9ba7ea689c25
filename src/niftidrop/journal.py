"""The commit journal of one conversion: the outputs it placed, recognised after a crash.

Before an output (or the sidecar) gets its final name, the identity of its
temporary file (device, inode and size, which a link or a rename keeps) is
recorded in a journal file (`niftidrop.api.convert_file`'s `journal`). A redo of the conversion
after a crash reads it back and finds the outputs it placed already, under their
final names or under the unique names `rename` gave them, instead of adding a
second name or reporting a conflict with them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from niftidrop.names import is_temp_name
from niftidrop.writer import Temporary, write_json_atomic


def identity_of(temp: Temporary) -> list[int]:
    """What recognises a committed file: its inode (kept by link and rename), and size."""
    return [*temp.inode, temp.size]


def read_journal(journal: Path | None) -> dict[str, list[int]]:
    """Final name → identity of the file placed (or about to be) under it or a suffixed one."""
    if journal is None:
        return {}
    try:
        data = json.loads(journal.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(name): list(value) for name, value in data.items() if isinstance(value, list)}


def write_journal(
    journal: Path, recorded: Mapping[str, list[int]], *, durable: bool, owner: str
) -> None:
    """Record `recorded` in `journal` atomically (and durably with `durable`)."""
    write_json_atomic(journal, recorded, durable=durable, owner=owner, kind="commit_record")


def find_own(final: Path, identity: list[int] | None) -> Path | None:
    """The name in `final`'s folder under which a crashed run placed the file `identity`
    describes (`final` or a `unique_name` of it); None if there is none."""
    if identity is None or len(identity) != 3:
        return None
    try:
        names = [entry.name for entry in os.scandir(final.parent)]
    except OSError:
        return None
    # Any name will do: the inode and size are this run's file, whatever `rename` chose.
    for name in names:
        if is_temp_name(name):
            continue
        try:
            info = (final.parent / name).lstat()
        except FileNotFoundError:
            continue
        if [info.st_dev, info.st_ino, info.st_size] == identity:
            return final.parent / name
    return None
