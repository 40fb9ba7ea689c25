"""The named file-system steps of an input's life: one seam for fault-injection tests.

Each step of the file protocol that changes the file system (a rename, a file
created, written or fsynced, a link, an unlink, a folder made or fsynced) first
calls `step(name)`. In production that does nothing. A test installs a hook that
raises an `OSError` or kills the process at a chosen step, then checks that the
guarantees of the README's "File protocol" hold after it. Every name is listed
in STEPS, so a test can tell whether its matrix covers them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Final

# The phases of writing one file atomically (writer.write_temp, writer.commit).
WRITE_PHASES: Final = ("create", "write", "fsync", "commit")
# Files written atomically, by kind: each kind goes through every phase.
WRITTEN: Final = (
    "output",  # a NIfTI output in the outbox
    "sidecar",  # its provenance `<stem>.json`
    "dseg",  # its label names `<stem>.dseg.tsv` (a label map with `labels`)
    "preview",  # its QC picture `<stem>.png`
    "commit_record",  # `.committing.json` in the claim folder: the outputs' inodes
    "converted_record",  # `.converted.json` in the claim folder
    "failure_record",  # `.failure.json` in the claim folder
    "move_record",  # `.moving.json` in the claim folder: where the input goes
    "error_record",  # `<name>.error.json` in failed
    "drop",  # an input a producer writes into the inbox (`niftidrop.drop`)
)
STEPS: Final = (
    "claim_rename",  # inbox → claim folder
    "folder_create",  # a missing folder under outbox, archive or failed
    "folder_fsync",  # a folder made durable after a rename, link or mkdir in it
    *(f"{kind}_{phase}" for kind in WRITTEN for phase in WRITE_PHASES),
    "input_link",  # claimed input → its name in archive or failed
    "copy_create",  # the copy fallback (archive or failed on another file system)
    "copy_write",
    "copy_fsync",
    "copy_link",  # the copy → its name in archive or failed
    "input_unlink",  # the claimed input leaves the claim folder
    "copy_unlink",  # the copy's temporary name goes, once the input has left
    "release",  # the claim folder is emptied for the next claim
    "event_create",  # a hand-off event kept in `<state>/events` (no fsync: page cache)
    "event_write",
    "event_commit",
    "event_remove",  # a delivered event leaves `<state>/events`
    "heartbeat_create",  # the heartbeat (not durable: no fsync)
    "heartbeat_write",
    "heartbeat_commit",
)

Hook = Callable[[str], None]
_hook: Hook | None = None


def step(name: str) -> None:
    """Announce the file-system step `name` (a no-op unless a test installed a hook)."""
    hook = _hook
    if hook is not None:
        hook(name)


@contextlib.contextmanager
def hooked(hook: Hook) -> Iterator[None]:
    """Call `hook(name)` at every step inside the block (tests only)."""
    global _hook  # noqa: PLW0603 - one process-wide seam, installed by tests
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous
