"""What the status page shows, kept in memory by the running service (README: Status page).

A request to the page must not walk the spool (an archive of 10,000 inputs takes
longer to list than the page may take to answer), so the service keeps here:

- the last `RECENT_LIMIT` conversions, newest first, from its own outcomes (none
  from before it started), each with the name of its preview when the PNG was
  beside the output as the input finished;
- the newest `FAILED_LIMIT` failed inputs (by their `.error.json`), read from the
  failed folder once at start, then updated by its own failures at once and by
  the recount for what others did (`retry`, a hand move, another instance);
- the folder counts, walked once the service has started (by the board's thread:
  a big archive does not hold up the start; until then each count is None); each
  input this service archives, fails
  or converts is counted at once (archive, failed, and its outputs and preview in
  the outbox), and a thread of the board counts again: inbox and claimed every
  `quick_interval` (the heartbeat interval), every folder every `full_interval`
  (the rescan interval), so what producers, `retry` and other hands change shows
  within those periods. An output that replaced one of the same name is counted
  once more than it should until the next full count.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from pathlib import Path, PurePosixPath
from typing import Any, Final, NamedTuple

from niftidrop.claims import CLAIMS, ERROR_SUFFIX, Converted, Failed, Outcome, now_iso, read_json
from niftidrop.names import reference_key
from niftidrop.spool import Spool

RECENT_LIMIT: Final = 50
FAILED_LIMIT: Final = 200
# Folders a quick count walks: small, and changed by producers all the time.
QUICK_FOLDERS: Final = ("inbox", CLAIMS)
# A full count walks failed once, for its names; these are the others.
OTHER_FOLDERS: Final = (*QUICK_FOLDERS, "outbox", "archive")
ALL_FOLDERS: Final = (*OTHER_FOLDERS, "failed")  # in the order `status` prints them


class Snapshot(NamedTuple):
    """What the page shows, copied at one moment."""

    counts: dict[str, int | None]  # None: not counted yet
    recent: list[dict[str, Any]]  # newest first
    failed: list[dict[str, Any]]  # newest first


class _Recent(NamedTuple):
    entry: dict[str, Any]
    preview: Path | None


class StatusBoard:
    """The counts, recent conversions and failed inputs of one spool, in memory (see
    the module docstring). Thread-safe: workers record, the server reads."""

    def __init__(self, spool: Spool, *, quick_interval: float, full_interval: float) -> None:
        self.spool = spool
        self.quick_interval = quick_interval
        self.full_interval = full_interval
        self._lock = threading.Lock()
        self._counts: dict[str, int | None] = dict.fromkeys(ALL_FOLDERS)
        self._recent: deque[_Recent] = deque(maxlen=RECENT_LIMIT)
        self._previews: dict[str, Path] = {}  # preview name in the outbox → its path
        self._failed: dict[str, dict[str, Any]] = {}  # name in failed → its entry
        self._failed_names: set[str] = set()  # every input in failed, shown or not
        self._failed_meanwhile: set[str] = set()  # failed by us during a full count
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"StatusBoard({self.spool!r})"

    # Start, recount, stop.

    def load(self) -> None:
        """Count every folder and read the failed folder's records."""
        self._count(full=True)

    def start(self) -> None:
        """Load and keep the counts current, in a thread of the board's own."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._recount, name="niftidrop-status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop counting; safe to call more than once, or without `start`."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _recount(self) -> None:
        with contextlib.suppress(OSError):  # a folder gone meanwhile: counted next time
            self.load()
        last_full = time.monotonic()
        while not self._stop.wait(self.quick_interval):
            full = time.monotonic() - last_full >= self.full_interval
            with contextlib.suppress(OSError):  # a folder gone meanwhile: counted next time
                self._count(full=full)
            if full:
                last_full = time.monotonic()

    def _count(self, *, full: bool) -> None:
        """Walk the folders (a quick count: inbox and claims only); a full count also
        brings the failed list up to date with the failed folder."""
        counts = self.spool.counts(OTHER_FOLDERS if full else QUICK_FOLDERS)
        if not full:
            with self._lock:
                self._counts.update(counts)
            return
        with self._lock:
            self._failed_meanwhile = set()
        folder = self.spool.failed_folder
        names = {path.relative_to(folder).as_posix() for path in self.spool.failed_inputs()}
        with self._lock:
            new = names - self._failed_names
        entries = _newest_entries(folder, new)  # read outside the lock: files
        with self._lock:
            # An input this service failed while the folder was walked may have been
            # missed by the walk: it is there all the same.
            names |= self._failed_meanwhile
            self._counts = {**counts, "failed": len(names)}
            self._failed_names = names
            for name in list(self._failed):
                if name not in names:  # retried, or moved away by hand
                    del self._failed[name]
            for entry in entries:
                self._failed[entry["name"]] = entry
            self._trim_failed()

    # The service's own outcomes (called by its workers).

    def record(self, outcome: Outcome) -> None:
        """Count and show what came of one input."""
        if isinstance(outcome, Converted):
            self._converted(outcome)
        elif isinstance(outcome, Failed):
            self._failed_input(outcome)

    def _converted(self, outcome: Converted) -> None:
        summary = outcome.summary
        output = summary.get("output")
        outputs = [output] if isinstance(output, str) else list(output or [])
        preview = self._preview_of(summary.get("preview"), outputs)
        name = None if preview is None else preview.relative_to(self.spool.outbox).as_posix()
        entry = {**summary, "converted_at": now_iso(), "preview": name}
        with self._lock:
            self._recent.appendleft(_Recent(entry, preview))
            self._previews = {
                item.entry["preview"]: item.preview
                for item in reversed(self._recent)  # the newest of a name wins
                if item.preview is not None
            }
            if outcome.archived_as is not None:
                self._add("archive", 1)
            self._add("outbox", len(outputs) + (preview is not None))

    def _preview_of(self, written: object, outputs: list[str]) -> Path | None:
        """The preview the conversion says it `written` (its name may differ from the
        outputs': `split`, `on_conflict = "rename"`), else the first output's
        `<stem>.png` when it is there; only ever a file in the outbox."""
        outbox = str(self.spool.outbox)
        if isinstance(written, str):
            path = Path(written)
            inside = os.path.normpath(path).startswith(outbox + os.sep)
            return path if inside and path.is_file() else None
        for output in outputs:
            path = Path(output)
            stem = reference_key(path.name)
            if stem is None or not os.path.normpath(path).startswith(outbox + os.sep):
                continue
            preview = path.with_name(stem + ".png")
            if preview.is_file():
                return preview
        return None

    def _failed_input(self, outcome: Failed) -> None:
        name = outcome.failed_as.relative_to(self.spool.failed_folder).as_posix()
        entry = _failed_entry(name, outcome.record)
        with self._lock:
            self._failed_meanwhile.add(name)
            if name not in self._failed_names:
                self._failed_names.add(name)
                self._add("failed", 1)
            self._failed[name] = entry
            self._trim_failed()

    def _add(self, folder: str, count: int) -> None:
        counted = self._counts.get(folder)
        if counted is not None:  # else the first count, still to come, includes it
            self._counts[folder] = counted + count

    def _trim_failed(self) -> None:
        """Keep the newest FAILED_LIMIT failed entries (the lock is held)."""
        if len(self._failed) > FAILED_LIMIT:
            newest = sorted(self._failed.values(), key=_failed_time, reverse=True)
            self._failed = {entry["name"]: entry for entry in newest[:FAILED_LIMIT]}

    # What the page reads.

    def snapshot(self) -> Snapshot:
        """The counts and lists as they are now (copies)."""
        with self._lock:
            counts = dict(self._counts)
            recent = [item.entry for item in self._recent]
            failed = list(self._failed.values())
        failed.sort(key=_failed_time, reverse=True)
        return Snapshot(counts, recent, failed)

    def preview(self, name: str) -> Path | None:
        """The path of the preview this service recorded as `name`, or None: a name
        is only ever looked up, never joined to a folder."""
        with self._lock:
            return self._previews.get(name)


def _failed_entry(name: str, record: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of one failed input (`name`: its path in failed)."""
    return {
        "name": name,
        "input": str(record.get("input", name)),
        "error": str(record.get("error", "")),
        "message": str(record.get("message", "")),
        "failed_at": str(record.get("failed_at", "")),
    }


def _failed_time(entry: dict[str, Any]) -> str:
    # ISO 8601 in UTC throughout: the strings sort as the times do.
    return str(entry["failed_at"])


def _newest_entries(folder: Path, names: set[str]) -> list[dict[str, Any]]:
    """The entries of the newest FAILED_LIMIT of `names` (by their `.error.json`'s
    modification time), reading only those records."""
    dated = []
    for name in names:
        record_path = folder / PurePosixPath(name + ERROR_SUFFIX)
        try:
            dated.append((record_path.stat().st_mtime, name, record_path))
        except OSError:
            dated.append((0.0, name, record_path))  # no record (yet): shown as it is
    dated.sort(reverse=True)
    return [
        _failed_entry(name, read_json(record_path) or {})
        for _, name, record_path in dated[:FAILED_LIMIT]
    ]
