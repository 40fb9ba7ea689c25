"""Tests of the inbox watcher: events become sightings, inotify and polling (README: File
protocol)."""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from niftidrop import inotify
from niftidrop.watcher import InboxWatcher, Seen, Sighting


class TestInboxWatcher:
    @pytest.fixture
    def watched(self, tmp_path: Path) -> Iterator[tuple[Path, queue.SimpleQueue[Sighting]]]:
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        watcher = InboxWatcher(inbox, sightings, observer="inotify")
        watcher.start()
        yield inbox, sightings
        watcher.stop()

    def collect(
        self, sightings: queue.SimpleQueue[Sighting], until: Callable[[list[Sighting]], bool]
    ) -> list[Sighting]:
        seen: list[Sighting] = []
        deadline = time.monotonic() + 10
        while not until(seen):
            assert time.monotonic() < deadline, f"only saw {seen}"
            with contextlib.suppress(queue.Empty):
                seen.append(sightings.get(timeout=0.1))
        return seen

    def test_rename_into_the_inbox_is_finished(
        self, watched: tuple[Path, queue.SimpleQueue[Sighting]], tmp_path: Path
    ) -> None:
        """A file moved in is reported finished."""
        inbox, sightings = watched
        np.save(tmp_path / "a.npy", np.zeros(3))
        (tmp_path / "a.npy").rename(inbox / "a.npy")
        seen = self.collect(sightings, bool)
        assert seen == [(inbox / "a.npy", Seen.FINISHED)]

    def test_write_in_place_is_written_then_finished(
        self, watched: tuple[Path, queue.SimpleQueue[Sighting]]
    ) -> None:
        """np.save in the inbox gives a created sighting, then a finished one at close."""
        inbox, sightings = watched
        np.save(inbox / "a.npy", np.zeros(3))
        seen = self.collect(sightings, lambda s: (inbox / "a.npy", Seen.FINISHED) in s)
        assert seen[0] == (inbox / "a.npy", Seen.WRITTEN)

    def test_new_subfolder_is_reported_and_watched(
        self, watched: tuple[Path, queue.SimpleQueue[Sighting]]
    ) -> None:
        """A new subfolder is reported for a scan, and files inside it are seen."""
        inbox, sightings = watched
        (inbox / "site").mkdir()
        self.collect(sightings, lambda s: (inbox / "site", Seen.FOLDER) in s)
        np.save(inbox / "site" / "b.npy", np.zeros(3))
        self.collect(sightings, lambda s: (inbox / "site" / "b.npy", Seen.FINISHED) in s)

    def test_hidden_and_moved_out_files_are_not_reported(
        self, watched: tuple[Path, queue.SimpleQueue[Sighting]], tmp_path: Path
    ) -> None:
        """Hidden names and files leaving the inbox produce no sighting."""
        inbox, sightings = watched
        np.save(inbox / ".hidden.npy", np.zeros(3))
        (inbox / "a.npy.tmp").write_bytes(b"")
        (inbox / "a.npy.tmp").rename(tmp_path / "elsewhere")
        np.save(inbox / "last.npy", np.zeros(3))
        seen = self.collect(sightings, lambda s: (inbox / "last.npy", Seen.FINISHED) in s)
        assert {path.name for path, _ in seen} == {"last.npy"}

    def test_queue_overflow_asks_for_a_full_rescan(self, tmp_path: Path) -> None:
        """When the kernel drops events, the whole inbox is reported for a scan."""
        sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        watcher = InboxWatcher(tmp_path, sightings, observer="inotify")
        watcher._handle(inotify.RawEvent(-1, inotify.IN_Q_OVERFLOW, 0, b""))
        assert sightings.get_nowait() == (tmp_path, Seen.FOLDER)

    def test_polling_observer_reports_files(self, tmp_path: Path) -> None:
        """The polling observer (network file systems) reports new files as written."""
        sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        watcher = InboxWatcher(tmp_path, sightings, observer="polling", poll_interval=0.1)
        watcher.start()
        try:
            np.save(tmp_path / "a.npy", np.zeros(3))
            seen = self.collect(sightings, lambda s: (tmp_path / "a.npy", Seen.WRITTEN) in s)
            assert all(kind is not Seen.FINISHED for _, kind in seen)
        finally:
            watcher.stop()

    def test_polling_inbox_below_a_hidden_folder_reports_files(self, tmp_path: Path) -> None:
        """A hidden folder above the inbox (`~/.local/...`) hides nothing from polling;
        hidden names inside the inbox stay hidden."""
        inbox = tmp_path / ".local" / "inbox"
        (inbox / ".state").mkdir(parents=True)
        sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        watcher = InboxWatcher(inbox, sightings, observer="polling", poll_interval=0.1)
        watcher.start()
        try:
            np.save(inbox / ".state" / "claimed.npy", np.zeros(3))
            np.save(inbox / ".hidden.npy", np.zeros(3))
            np.save(inbox / "a.npy", np.zeros(3))
            seen = self.collect(sightings, lambda s: (inbox / "a.npy", Seen.WRITTEN) in s)
            assert {path.name for path, _ in seen} == {"a.npy"}
        finally:
            watcher.stop()
