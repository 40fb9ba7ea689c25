"""The reference library: an in-memory index of reference scans, kept current.

See the README, "Reference matching" (the rules themselves are in `matching`).
The library folders are scanned once into
a table of keys → paths; every lookup after that is a few dict lookups and one
bisect in memory, never a disk access. While started, a watchdog observer and a
periodic rescan (which lists again only folders whose mtime changed) keep the
table current. One writer at a
time changes it, under the same lock that lookups take, so a lookup never sees
half of a change; a full rebuild is swapped in at once.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from niftidrop import matching
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.matching import Match, MatchReport, MatchRules
from niftidrop.names import input_key
from niftidrop.observers import FolderWatches, is_within, make_observer
from niftidrop.reference_index import (
    NAME_EVENTS,
    ChangeHandler,
    FolderSnapshot,
    ReferenceIndex,
    ReferenceKeys,
    ReferenceScanner,
    changes_at,
)
from niftidrop.reference_views import View, ViewPlan, plan_views

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

    from niftidrop.settings import Settings

# `Match` lives in `matching`; it stays importable from here for the service.
__all__ = ["Match", "ReferenceLibrary", "Resolve"]


class Resolve(Protocol):
    """`ReferenceLibrary.resolve`: the match for an input name, by a profile's rules."""

    def __call__(self, name: str, profile: str | None = None, /) -> Match: ...


class ReferenceLibrary:
    """The reference scans of one or more library folders, indexed by key.

    `build()` indexes the folders; `match()` and `resolve()` answer from memory and
    are safe to call from many threads; `start()` keeps the index current until
    `stop()`. Keys shared by several files are ambiguous, never guessed.
    """

    def __init__(
        self,
        folders: Sequence[Path],
        *,
        separators: str = "_-.",
        key_pattern: str | None = None,
        reference_wait: float = 0.0,
        missing_reference: str = "fail",
        rescan_interval: float = 30.0,
        observer: str = "auto",
        poll_interval: float = 1.0,
        views: ViewPlan | None = None,
    ) -> None:
        if missing_reference not in ("fail", "identity"):
            raise ValueError(
                f"missing_reference: expected fail or identity, found {missing_reference!r}"
            )
        self.folders = tuple(Path(folder).absolute() for folder in folders)
        self._roots = tuple(str(folder) for folder in self.folders)
        if views is None:  # one view: every folder, these rules
            rules = MatchRules(separators, key_pattern, self._roots)
            views = ViewPlan.single(rules, reference_wait, missing_reference)
        self._views = views  # per profile (README: Profiles); `_top` for the top level
        self._top = views.top
        self.reference_wait = reference_wait
        self.missing_reference = missing_reference
        self.rescan_interval = rescan_interval
        self.observer = observer
        self.poll_interval = poll_interval
        self._key_of = ReferenceKeys(re.compile(views.pattern) if views.pattern else None)
        self._index = ReferenceIndex()
        self._built = False
        # `_lock` guards the index: readers hold it for one lookup, writers to apply
        # a change. Writers also hold `_writer` for a whole update (disk reads
        # included) so updates never interleave. `_changed` wakes waiting resolves.
        self._lock = threading.Lock()  # a bare Lock: cheaper to take than a Condition
        self._changed = threading.Condition(self._lock)
        self._writer = threading.Lock()
        self._lifecycle = threading.Lock()
        self._watching = False
        self._snapshots: dict[str, FolderSnapshot] = {}  # folders of the last walk
        self._live: _LiveUpdates | None = None  # while started; changed under _writer

    @classmethod
    def from_settings(cls, settings: Settings) -> ReferenceLibrary:
        """The library of `settings`, its profiles' folders and rules included."""
        return cls(
            settings.all_library_dirs,
            separators=settings.separators,
            key_pattern=settings.key_pattern,
            reference_wait=settings.reference_wait,
            missing_reference=settings.missing_reference,
            rescan_interval=settings.rescan_interval,
            observer=settings.observer,
            poll_interval=settings.poll_interval,
            views=plan_views(settings),
        )

    @property
    def separators(self) -> str:
        """The characters that split keys into tokens, each once."""
        return self._top.rules.separators

    @property
    def key_pattern(self) -> str | None:
        """The regex whose group named key gives the keys, if any."""
        return self._top.rules.key_pattern

    def __len__(self) -> int:
        with self._lock:
            return self._index.size

    def __repr__(self) -> str:
        folders = ", ".join(self._roots)
        return f"ReferenceLibrary([{folders}], references={len(self)})"

    # Indexing.

    def build(self) -> None:
        """Index every library folder from disk, then swap the new index in at once.

        While started, lost watches are set again first (see `renew_watches`).
        """
        with self._writer:
            self._renew_lost_watches()
            scanner = ReferenceScanner(self._key_of)
            index = ReferenceIndex(entry for root in self._roots for entry in scanner.scan(root))
            with self._lock:
                self._index = index
                self._views.rebuild(index)
                self._built = True
                self._changed.notify_all()
            self._after_walk(scanner)

    def rescan(self) -> None:
        """Bring the whole index in line with the disk, listing only changed folders.

        The periodic safety net for lost events (README: File protocol): folders whose mtime
        has not moved are not listed again, so a rescan of an unchanged library
        costs one `stat` per folder.
        """
        with self._writer:
            scanner = ReferenceScanner(self._key_of, previous=self._snapshots)
            found = [entry for root in self._roots for entry in scanner.scan(root)]
            removals, additions = self._index.changes_for_walk(
                found, scanner.listed, scanner.snapshots
            )
            if removals or additions:
                self._change_index(removals, additions)
            self._after_walk(scanner)

    def _after_walk(self, scanner: ReferenceScanner) -> None:
        self._snapshots = scanner.snapshots
        if self._live is not None:
            self._live.watch_linked_folders(scanner.linked)

    def _change_index(
        self, removals: Sequence[tuple[str, str]], additions: Sequence[tuple[str, str]]
    ) -> None:
        """Apply changes for readers to see at once, and wake `resolve` calls waiting."""
        with self._lock:
            for key, path in removals:
                self._index.discard(key, path)
            for key, path in additions:
                self._index.add(key, path)
            self._views.apply(removals, additions)
            self._changed.notify_all()

    def _apply(self, changes: Iterable[tuple[str, bool]]) -> None:
        """Bring the index in line with the disk for the paths that changed."""
        with self._writer:
            self._change_index(*changes_at(self._index, self._key_of, changes, self.folders))

    # Lookups.

    def _view(self, profile: str | None) -> View:
        return self._top if profile is None else self._views.view(profile)

    def match(self, name: str, profile: str | None = None) -> Match:
        """The reference for input `name` by `profile`'s matching rules, from memory only.

        Raises `ConversionError` with `no_reference`, or `ambiguous_reference`
        carrying the equally good candidates.
        """
        view = self._view(profile)
        with self._lock:
            return matching.match(view.keyed.index, name, view.rules)

    def resolve(self, name: str, profile: str | None = None) -> Match:
        """`match`, but wait up to `reference_wait` for a missing reference, then
        apply `missing_reference` (`identity`: a match without a reference), `profile`'s.

        The wait is woken by index updates, so it only helps while `start()`ed.
        """
        view = self._view(profile)
        deadline = time.monotonic() + view.reference_wait
        with self._lock:
            while True:
                try:
                    return matching.match(view.keyed.index, name, view.rules)
                except ConversionError as error:
                    if error.code is not ErrorCode.NO_REFERENCE:
                        raise
                    remaining = deadline - time.monotonic()
                    if self._watching and remaining > 0:
                        self._changed.wait(remaining)
                        continue
                    if view.missing_reference == "identity":
                        key = view.rules.key_for(name) or input_key(name)
                        return Match(name, key, None, "identity", ())
                    raise

    def key_for(self, name: str, profile: str | None = None) -> str | None:
        """The key of input `name` (after `profile`'s `key_pattern`); None if the
        pattern does not match."""
        return self._view(profile).rules.key_for(name)

    def describe(self, name: str, profile: str | None = None) -> MatchReport:
        """`match(name, profile)` as plain data, an error included (`niftidrop match --json`)."""
        view = self._view(profile)
        with self._lock:
            return matching.describe(view.keyed.index, name, view.rules)

    # Watching.

    def start(self, rescan_interval: float | None = None) -> None:
        """Keep the index current: watch the folders and rescan every `rescan_interval`.

        The watch is live before the folders are walked (a full build if `build()`
        was never called, else a rescan), so a reference added meanwhile is seen by
        the walk or by its event; applying both is harmless, as every change is
        checked against the disk. Idempotent.
        """
        with self._lifecycle:
            if self._live is not None:
                return
            interval = rescan_interval if rescan_interval is not None else self.rescan_interval
            watcher = make_observer(self.observer, self.poll_interval, self._roots)
            watcher.start()
            with self._writer:
                live = self._live = _LiveUpdates(self, watcher)
            if self._built:
                self.rescan()
            else:
                self.build()
            live.start_updater(interval)
            with self._lock:
                self._watching = True

    def stop(self) -> None:
        """Stop watching; the index stays as it is. Idempotent."""
        with self._lifecycle:
            live = self._live
            with self._lock:
                self._watching = False
                self._changed.notify_all()  # waiting `resolve` calls give up now
            if live is not None:
                live.stop_updater()  # first: its rescan may still schedule watches
                with self._writer:
                    self._live = None
                live.observer.stop()
                live.observer.join()

    def renew_watches(self) -> list[Path]:
        """Watch again every library folder whose watch was lost, and index what it holds.

        A watch ends when its folder is deleted, and follows the folder when it is
        renamed away; a folder made again at the same path would never be watched.
        Called at every periodic rescan (and, while a watched folder is missing,
        every `poll_interval`); returns the folders watched again.
        """
        with self._writer:
            renewed = self._renew_lost_watches()
        if renewed:
            self.rescan()  # after the new watch is live: nothing falls in between
        return [Path(path) for path in renewed]

    def _renew_lost_watches(self) -> list[str]:
        """The writer's part of `renew_watches`: the paths watched again."""
        return [] if self._live is None else self._live.renew_lost()

    def __enter__(self) -> ReferenceLibrary:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class _LiveUpdates:
    """What keeps a started library current: an observer's watches on the library
    folders (and on symlinked folders that lead out of them), whose handlers queue
    the names that change, and the single writer thread that applies them.

    Made by `start()` and dropped by `stop()`; its watches change under the
    library's `_writer` only.
    """

    def __init__(self, library: ReferenceLibrary, observer: BaseObserver) -> None:
        self._library = library  # its roots, key rule, writer steps and poll_interval
        self.observer = observer
        self._changes: queue.SimpleQueue[tuple[str, bool] | None] = queue.SimpleQueue()
        self._watches = FolderWatches(observer, self._handler_for, NAME_EVENTS)
        self._linked_watched: set[str] = set()  # the symlinked folders among them
        watched = [self._watches.watch(root) for root in library._roots]
        self.renew_due = not all(watched)  # a missing folder is watched once made
        self._updater: threading.Thread | None = None

    def start_updater(self, interval: float) -> None:
        """Start the writer thread, rescanning every `interval`."""
        self._updater = threading.Thread(
            target=self._follow_changes, args=(interval,), name="niftidrop-library", daemon=True
        )
        self._updater.start()

    def stop_updater(self) -> None:
        """Stop the writer thread (if it was started) and wait for it to end."""
        if self._updater is not None:
            self._changes.put(None)
            self._updater.join()

    def renew_lost(self) -> list[str]:
        """Watch again the folders whose watch was lost; the paths watched again."""
        renewed, still_lost = self._watches.renew_lost()
        self.renew_due = still_lost  # a watched folder went: look for it every poll_interval
        return renewed

    def _handler_for(self, real: str, path: str) -> ChangeHandler:
        """The handler of a watch on folder `real`, reached (and indexed) as `path`."""
        seen_as = (real, path) if real != path else None
        return ChangeHandler(self._changes, self._library._key_of, seen_as=seen_as)

    def watch_linked_folders(self, linked: list[str]) -> None:
        """Watch symlinked folders that lead out of the library folders.

        The observer does not follow symlinks (it could loop), so each such folder
        gets a watch on its real path whose events are renamed back to the path
        the index knows. Called by the writer after every walk, with the symlinked
        folders it walked.
        """
        watches = self._watches
        real_roots = [os.path.realpath(root) for root in self._library._roots]
        wanted: dict[str, str] = {}  # one watch per real folder, however many links lead there
        for link in linked:
            real = os.path.realpath(link)
            if not any(is_within(real, root) for root in real_roots):
                wanted.setdefault(real, link)
        links = set(wanted.values())
        for link in self._linked_watched - links:
            watches.forget(link)
        for link in links - self._linked_watched:
            watches.watch(link)
        self._linked_watched = links

    def _follow_changes(self, interval: float) -> None:
        """The single writer thread: applies queued changes, rebuilds every `interval`,
        and renews lost watches (before each rescan, so the rescan sees what a new
        watch may have missed)."""
        library = self._library
        next_rescan = time.monotonic() + interval
        while True:
            wake = next_rescan
            if self.renew_due:
                wake = min(wake, time.monotonic() + library.poll_interval)
            try:
                change = self._changes.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                renewed = library.renew_watches()
                if time.monotonic() >= next_rescan:
                    if not renewed:  # else `renew_watches` rescanned already
                        library.rescan()
                    next_rescan = time.monotonic() + interval
                continue
            batch = [change]
            while not self._changes.empty():
                batch.append(self._changes.get_nowait())
            if None in batch:
                return
            changes = [item for item in batch if item is not None]
            library._apply(changes)
            if any(folder and path in self._watches for path, folder in changes):
                self.renew_due = True  # a watched folder itself changed: its watch may be gone
