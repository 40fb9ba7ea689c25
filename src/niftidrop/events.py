"""The hand-off's events (README: Hand-off): what an input's finish tells the next step,
kept in the state folder until every target has it.

An event is one JSON object per input that reaches archive or failed: the fields
of its `input_converted` or `input_failed` log line, the absolute paths of what it
left (outputs, sidecar, label table, the archived or failed input and its `.error.json`),
`event` ("converted" or "failed") and an `id` unique to that finish.

Delivery is at least once. `EventStore.record` writes the event to
`<state>/events/<id>.json` while the input is still claimed, before the unlink
that makes its move final; only once the input has
left (`released`) is it handed to the delivery. A `kill -9` before the record
leaves the input claimed: the next start finishes the move and records the event
then. A kill after it leaves the event pending: the next start delivers it, or,
if the input is still claimed, keeps it for the redo, which records it again
under the same `id` (the record names the claimed input and its inode). An event
leaves the folder once each target has it (`remove`), or has refused it
`hook_attempts` times.

The record is not fsynced, as the claim's move record is not: the page cache
keeps it through any crash of the process (`kill -9`, the OOM killer), and a
fsync per input would cost more than converting a small one. After a power cut
or a kernel crash within the kernel's writeback delay, an event whose input's
unlink reached the disk can be lost (README: Hand-off).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from niftidrop.claims import (
    CLAIMS,
    ERROR_SUFFIX,
    Claim,
    Converted,
    Outcome,
    SpoolFolders,
    read_json,
)
from niftidrop.instances import INSTANCES
from niftidrop.names import is_temp_name
from niftidrop.settings import Settings
from niftidrop.steps import step
from niftidrop.writer import write_json_atomic

EVENTS: Final = "events"
# The targets an event can have: the hook command of its kind, and notify_url.
HOOK: Final = "hook"
NOTIFY: Final = "notify"


@dataclass
class Pending:
    """An event in the state folder, and the tries each target still waiting for it
    has failed so far (`tries`: target → count)."""

    id: str
    event: dict[str, Any]
    tries: dict[str, int]
    claimed: str  # the claimed input it was recorded for, and its inode
    inode: tuple[int, int] = field(compare=False)

    @property
    def input(self) -> str:
        return str(self.event.get("input", ""))

    def record(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "tries": self.tries,
            "claimed": self.claimed,
            "inode": list(self.inode),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Pending | None:
        """The pending event a record file holds; None if it is not one."""
        event, tries, inode = record.get("event"), record.get("tries"), record.get("inode")
        if not isinstance(event, dict) or not isinstance(event.get("id"), str):
            return None
        if not isinstance(tries, dict) or not isinstance(inode, list) or len(inode) != 2:
            return None
        return cls(
            event["id"],
            event,
            {str(target): int(count) for target, count in tries.items()},
            str(record.get("claimed", "")),
            (int(inode[0]), int(inode[1])),
        )


def event_of(outcome: Outcome, event_id: str) -> dict[str, Any]:
    """The event of an input's finish: its log line's fields and the paths it left."""
    if isinstance(outcome, Converted):
        summary = outcome.summary
        output = summary.get("output")
        outputs = output if isinstance(output, list) else [] if output is None else [output]
        return {
            "event": "converted",
            "id": event_id,
            **summary,
            "outputs": [str(path) for path in outputs],
            "sidecar": summary.get("sidecar"),
            "dseg": summary.get("dseg"),  # the label table, beside a label map with labels
            "archived": None if outcome.archived_as is None else str(outcome.archived_as),
        }
    record = outcome.record
    found: dict[str, Any] = {
        key: record[key] for key in ("reference", "candidates") if key in record
    }
    return {
        "event": "failed",
        "id": event_id,
        "input": record.get("input", str(outcome.claim.relative)),
        "error": record.get("error"),
        "message": record.get("message"),
        **found,
        "failed_as": str(outcome.failed_as),
        "error_file": str(outcome.failed_as.with_name(outcome.failed_as.name + ERROR_SUFFIX)),
    }


def new_id() -> str:
    """An event id: its time (so that ids sort by age) and a random part."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ-") + secrets.token_hex(4)


class EventStore:
    """The pending events of one spool, in `<state>/events`; see the module docstring.

    `listener` is told of each event once its input has left the claim folder.
    """

    def __init__(self, spool: SpoolFolders, settings: Settings) -> None:
        self.folder = spool.instance_folder / EVENTS
        self._spool = spool
        notify = [NOTIFY] if settings.notify_url else []
        self._targets = {
            "converted": ([HOOK] if settings.on_converted else []) + notify,
            "failed": ([HOOK] if settings.on_failed else []) + notify,
        }
        self._lock = threading.Lock()
        # Claimed input → the event recorded for it, until the input has left.
        self._unfinished: dict[str, Pending] = {}
        self.listener: Callable[[Pending], None] | None = None

    def __repr__(self) -> str:
        return f"EventStore({str(self.folder)!r})"

    @classmethod
    def of(cls, spool: SpoolFolders, settings: Settings) -> EventStore | None:
        """The store of a spool whose settings name a hook or notify_url; else None."""
        if settings.on_converted or settings.on_failed or settings.notify_url:
            return cls(spool, settings)
        return None

    def record(self, outcome: Outcome) -> None:
        """Keep the event of `outcome` (its input still claimed) before the move is final.

        A claim finished again (a redo after a crash, a retry after an error) keeps
        the event recorded for the same input, id included.
        """
        kind = "converted" if isinstance(outcome, Converted) else "failed"
        targets = self._targets[kind]
        if not targets:
            return
        claimed = str(outcome.claim.path)
        info = os.lstat(claimed)
        inode = (info.st_dev, info.st_ino)
        with self._lock:
            pending = self._unfinished.get(claimed)
            if pending is None or pending.inode != inode:
                event_id = new_id()
                event = event_of(outcome, event_id)
                pending = Pending(event_id, event, dict.fromkeys(targets, 0), claimed, inode)
                # Before the write: a write that fails after naming the file is
                # retried under the same id, not added under a second one.
                self._unfinished[claimed] = pending
        self.save(pending)  # not fsynced: see the module docstring

    def released(self, claim: Claim) -> None:
        """The input of `claim` has left: its event goes to the listener."""
        with self._lock:
            pending = self._unfinished.pop(str(claim.path), None)
        if pending is not None and self.listener is not None:
            self.listener(pending)

    def load(self) -> list[Pending]:
        """The events a previous run left (at start, before any claim is handled),
        oldest first, without those whose input is still claimed: its redo records
        them again, and releases them."""
        ready = []
        for path in _event_files(self.folder):
            record = read_json(path)
            pending = None if record is None else Pending.from_record(record)
            if pending is None:
                continue  # not an event of ours: left alone
            try:
                info = os.lstat(pending.claimed)
                claimed = (info.st_dev, info.st_ino) == pending.inode
            except OSError:
                claimed = False
            if claimed:
                with self._lock:
                    self._unfinished[pending.claimed] = pending
            else:
                ready.append(pending)
        return ready

    def adopt(self, expired: list[tuple[str, str]] | None = None) -> list[tuple[str, int]]:
        """Take over the events left by instances whose lease has expired (before their
        claims: README, Many instances, one spool): (instance, events taken), for each
        instance something was taken from. An event whose input is still in the dead
        instance's claim folder is removed instead: that claim, adopted and finished
        again, records it anew. The others are renamed into this instance's folder (of
        two adopters one wins each) and go to the listener. `expired`: the instances'
        `expired_instances()`, when already known."""
        adopted = []
        for name, _ in self._spool.expired_instances() if expired is None else expired:
            folder = self._spool.state / INSTANCES / name / EVENTS
            count = sum(self._adopt_one(path) for path in _event_files(folder))
            if count:
                adopted.append((name, count))
        return adopted

    def _adopt_one(self, path: Path) -> bool:
        record = read_json(path)
        pending = None if record is None else Pending.from_record(record)
        if pending is None:
            return False  # not an event of ours: left alone
        if os.path.lexists(_claimed_here(pending.claimed, path.parent.parent)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            path.rename(self.folder / path.name)
        except FileNotFoundError:
            return False  # another instance took it first
        if self.listener is not None:
            self.listener(pending)
        return True

    def save(self, pending: Pending) -> None:
        """Write `pending` with its tries so far (not fsynced: see the module docstring)."""
        path = self.folder / f"{pending.id}.json"
        owner = self._spool.owner
        try:
            write_json_atomic(path, pending.record(), durable=False, owner=owner, kind="event")
        except FileNotFoundError:
            if self.folder.is_dir():
                raise
            # The first event, or the state folder was removed (the guard makes it again).
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, pending.record(), durable=False, owner=owner, kind="event")

    def remove(self, pending: Pending) -> None:
        """`pending` is delivered (or dropped): it leaves the folder."""
        step("event_remove")
        with contextlib.suppress(FileNotFoundError):
            (self.folder / f"{pending.id}.json").unlink()

    def targets(self, kind: str) -> list[str]:
        """The targets an event of `kind` ("converted", "failed") has now."""
        return self._targets.get(kind, [])


def _event_files(folder: Path) -> list[Path]:
    """The event files in `folder`, oldest first (their names start with the time)."""
    try:
        paths = sorted(folder.iterdir())
    except FileNotFoundError:
        return []
    return [path for path in paths if path.suffix == ".json" and not is_temp_name(path.name)]


def _claimed_here(claimed: str, instance_folder: Path) -> Path:
    """The claimed input an event names, as this host sees it: the dead instance may
    have mounted the spool elsewhere, so the part after `instances/<name>/claimed/`
    is taken under `instance_folder`."""
    marker = f"/{INSTANCES}/{instance_folder.name}/{CLAIMS}/"
    _, found, rest = claimed.partition(marker)
    return instance_folder / CLAIMS / rest if found else Path(claimed)
