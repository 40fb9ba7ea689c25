"""The inbox side of the service's main thread (README: File protocol).

What the inbox watcher saw and what rescans find is noted in the readiness
tracker; the files it says may be read become jobs of the worker pool, the
truncated ones too (to fail as truncated). Everything here runs on the main
thread, which owns every decision; the watcher only hands it sightings.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
from pathlib import Path
from typing import TYPE_CHECKING

from niftidrop.completeness import Readiness, readiness
from niftidrop.jobs import Job
from niftidrop.listing import scan_inbox
from niftidrop.logs import get_logger
from niftidrop.readiness import ReadinessTracker
from niftidrop.watcher import InboxWatcher, Seen, Sighting

if TYPE_CHECKING:
    from niftidrop.settings import Settings
    from niftidrop.spool import Spool
    from niftidrop.workers import WorkerPool

log = get_logger()


class Intake:
    """The inbox files noticed and not yet handed on, and how they are handed on."""

    def __init__(self, settings: Settings, spool: Spool, pool: WorkerPool) -> None:
        self.settings = settings
        self.spool = spool
        self._sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()  # the watcher's
        self._pool = pool
        self._tracker = ReadinessTracker(
            settle_seconds=settings.settle_seconds,
            incomplete_timeout=settings.incomplete_timeout,
        )
        self._unreachable_seen: set[Path] = set()  # inbox paths too long to use, logged

    def __repr__(self) -> str:
        return f"Intake({self.spool.inbox}, waiting={len(self)})"

    def __len__(self) -> int:
        """Files noticed that are not yet ready (still settling or incomplete)."""
        return len(self._tracker)

    def paths(self) -> list[Path]:
        """The files of `len`."""
        return self._tracker.paths()

    def watcher(self, observer: str) -> InboxWatcher:
        """A watcher of the inbox (not yet started) that hands its sightings to this."""
        return InboxWatcher(
            self.spool.inbox,
            self._sightings,
            recursive=self.settings.recursive,
            observer=observer,
            poll_interval=self.settings.poll_interval,
        )

    def take_sightings(self, timeout: float) -> list[Path]:
        """Note what the watcher saw; returns the files seen finished."""
        try:
            batch = [self._sightings.get(timeout=timeout)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while True:
                batch.append(self._sightings.get_nowait())
        finished = []
        for path, seen in batch:
            if seen is Seen.FOLDER:
                found_in = scan_inbox(
                    path, recursive=self.settings.recursive, unreachable=self._unreachable
                )
                for found in found_in:
                    self._note(found, finished=False)
            elif self._note(path, finished=seen is Seen.FINISHED) and seen is Seen.FINISHED:
                finished.append(path)
        return finished

    def _note(self, path: Path, *, finished: bool) -> bool:
        if self._pool.queued(path):
            return False
        self._tracker.note(path, finished=finished)
        return True

    def decide(self, paths: list[Path] | None = None) -> None:
        """Hand on the files (all noticed, or `paths`) the tracker says are ready or truncated."""
        verdicts = self._tracker.poll(paths)
        for path, mtime_ns in verdicts.ready:
            self._pool.submit(Job(path), mtime_ns)
        for path in verdicts.truncated:
            self._pool.submit(Job(path, truncated=True), 0)
        for path, reason in verdicts.ignored:  # left where it is; reported once
            log.warning("input_ignored", input=str(self.spool.relative(path)), reason=reason)

    def rescan(self) -> None:
        """Note every candidate in the inbox, then `decide`."""
        found = scan_inbox(
            self.spool.inbox, recursive=self.settings.recursive, unreachable=self._unreachable
        )
        for path in found:
            if path not in self._tracker:
                self._note(path, finished=False)
        self.decide()

    def report_waiting(self) -> int:
        """`run --once` is over: log each file still waiting (`input_incomplete`, with
        the reason it was not read) and return how many there are. They stay in the inbox."""
        paths = self.paths()
        for path in paths:
            log.warning(
                "input_incomplete",
                input=str(self.spool.relative(path)),
                reason=self._why_waiting(path),
            )
        return len(paths)

    def _why_waiting(self, path: Path) -> str:
        """Why `path` was not read: incomplete, or complete but not yet quiet."""
        left = "left in the inbox"
        try:
            info = path.lstat()
        except OSError as error:
            return f"it could not be looked at: {error.strerror}"
        quiet = max(0.0, time.time() - info.st_mtime)
        if readiness(path) is not Readiness.INCOMPLETE:
            return (
                f"still being written: it changed {quiet:.1f} s ago (a file is read once "
                f"unchanged for settle_seconds, {self.settings.settle_seconds:g} s); {left}"
            )
        whole = "zip directory and every member" if path.suffix.lower() == ".npz" else "header"
        return (
            f"incomplete: {info.st_size} bytes, fewer than a whole file needs (its {whole} "
            f"and every byte they declare), unchanged for {quiet:.1f} s; {left} (the service "
            f"fails such a file as truncated once it is unchanged for incomplete_timeout, "
            f"{self.settings.incomplete_timeout:g} s)"
        )

    def _unreachable(self, path: Path) -> None:
        """A file or folder whose path is too long to be used: logged once, left alone."""
        if path in self._unreachable_seen:
            return
        self._unreachable_seen.add(path)
        log.warning(
            "input_ignored",
            input=str(self.spool.relative(path)),
            reason=f"its path is longer than the system allows ({len(os.fsencode(path))} "
            "bytes): it cannot be opened by name, so it is left where it is",
        )
