"""The file protocol (README: File protocol): inbox → claimed → outbox + archive, or failed.

Layout of the state folder:

    <state>/claimed/<token>/<rel>/<name>    a claimed input
    <state>/claimed/<token>/.converted.json  its output is durable (summary)
    <state>/claimed/<token>/.failure.json    it was rejected (the error record)
    <state>/claimed/<token>/.moving.json     where in archive or failed it is going
    <state>/claimed/<token>/.committing.json the inodes of its outputs (rename, fail)
    <state>/heartbeat.json, <state>/lock
    <state>/owner                            this state folder's id (temporary names)

Each claim has a token folder to itself, made atomically by `mkdtemp`, so two
inputs with the same name never meet, and the relative path survives a crash.
A token folder outlives its claim: once the input has left, the folder is
emptied and handed to the next claim. Making and removing a folder for every
input costs more than converting a small one on file systems that are slow to
reuse freed inodes (ext4 without a journal skips every inode freed in the last
minute, one by one, on each file it creates). A folder found empty at start is
removed.

`.converted.json` spares a redo after a crash. It is written (durably) only when
a redo would not be idempotent (`on_conflict` `rename` or `fail`); with
`overwrite` the redo writes the same bytes under the same name. A crash between
the outputs' names and `.converted.json` is covered by `.committing.json`, written
by the conversion before it names its outputs: their inodes, by which a redo
recognises what it placed already (see `niftidrop.api.convert_file`).

Inputs leave the claim folder by `link()` + `unlink()`, never by `rename()`:
`link()` refuses to replace an existing name (archive and failed are never
overwritten), and it keeps the inode. It also keeps the inbox watch free of
move-out events. Where links are refused (archive or failed on another file
system) a copy is made under a temporary name and linked instead. Before the
link, `.moving.json` records the name chosen (and the copy's name and inode), so
a retry or a restart after any step finishes that move rather than making a
second one, without relying on link counts. A failed input is linked first, then
its `.error.json` is written; the record is kept in the claim folder until both
exist. Every file-system step is announced to `niftidrop.steps` (the seam of the
fault-injection tests).

`Spool` is built in layers, each in its module: `niftidrop.claims` (a claim, the
records of its folder, the spool's folders, lock and owner id),
`niftidrop.claiming` (inputs claimed, the claims found at start, release),
`niftidrop.finishing` (to archive or failed, and a move a crash interrupted);
`Spool` adds the commands (retry, counts, heartbeat).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from niftidrop.claiming import holds_input
from niftidrop.claims import CLAIMS, ERROR_SUFFIX, now_iso, read_json
from niftidrop.finishing import Finisher
from niftidrop.listing import scan_inbox
from niftidrop.names import is_candidate
from niftidrop.writer import link_unique, write_json_atomic


class Spool(Finisher):
    """The spool folders of one service and every move between them."""

    # Commands: retry, status, heartbeat.

    def failed_inputs(self) -> list[Path]:
        """Inputs in failed (their `.error.json` files excluded)."""
        return sorted(
            Path(root) / name
            for root, _, files in os.walk(self.failed_folder)
            for name in files
            if not name.startswith(".") and not name.endswith(ERROR_SUFFIX)
        )

    def retry(self, names: Sequence[str] = ()) -> list[Path]:
        """Move failed inputs (all, or those named in `names`: see `_named`)
        back into the inbox under their original relative path; removes their
        `.error.json`. Returns the inbox paths."""
        moved = []
        for failed_input in self.failed_inputs():
            relative = PurePosixPath(failed_input.relative_to(self.failed_folder).as_posix())
            if names and not self._named(failed_input, names):
                continue
            error_path = failed_input.with_name(failed_input.name + ERROR_SUFFIX)
            original = (read_json(error_path) or {}).get("input")
            if isinstance(original, str) and _is_safe_relative(original):
                relative = PurePosixPath(original)
            target = link_unique(
                failed_input, self.inbox / relative.parent, name=relative.name, fsync=self.durable
            )
            failed_input.unlink()
            with contextlib.suppress(FileNotFoundError):
                error_path.unlink()
            moved.append(target)
        return moved

    def not_failed(self, names: Sequence[str]) -> list[str]:
        """The names among `names` that `retry` would find no failed input for."""
        failed = self.failed_inputs()
        return [name for name in names if not any(self._named(path, [name]) for path in failed)]

    def _named(self, failed_input: Path, names: Sequence[str]) -> bool:
        """Whether one of `names` is the failed input's name, its path relative to
        failed, or a path to it."""
        relative = failed_input.relative_to(self.failed_folder).as_posix()
        path = failed_input.resolve()
        return any(
            name in (failed_input.name, relative) or Path(name).resolve() == path for name in names
        )

    def counts(self, only: Collection[str] | None = None) -> dict[str, int]:
        """How many files each folder holds (inputs, outputs, claims); with `only`,
        just the folders named in it (the others are not walked)."""
        counters: dict[str, Callable[[], int]] = {
            "inbox": lambda: sum(1 for _ in scan_inbox(self.inbox, recursive=self.recursive)),
            # Counted, not listed: `claims()` tidies up, which is the service's business.
            CLAIMS: lambda: sum(holds_input(folder) for folder in _folders(self.claims_folder)),
            "outbox": lambda: _count_files(self.outbox, lambda name: not name.endswith(".json")),
            "archive": lambda: _count_files(self.archive_folder, is_candidate),
            "failed": lambda: len(self.failed_inputs()),
        }
        return {name: count() for name, count in counters.items() if only is None or name in only}

    def write_heartbeat(self, details: Mapping[str, Any]) -> None:
        """Replace the heartbeat file (atomically: readers never see half of it)."""
        write_json_atomic(
            self.heartbeat_path,
            {
                "time": now_iso(),
                "instance": self.instance,
                "pid": os.getpid(),
                "host": socket.gethostname(),  # the status page's instance
                **details,
            },
            durable=False,
            owner=self.owner,
            kind="heartbeat",
        )

    def heartbeat_age(self, now: float) -> float | None:
        """Seconds since the last heartbeat, or None if there is none."""
        try:
            return now - self.heartbeat_path.stat().st_mtime
        except OSError:
            return None


def _is_safe_relative(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts


def _folders(folder: Path) -> list[Path]:
    try:
        return [Path(entry) for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _count_files(folder: Path, accept: Callable[[str], bool]) -> int:
    return sum(
        1
        for _, _, files in os.walk(folder)
        for name in files
        if not name.startswith(".") and accept(name)
    )
