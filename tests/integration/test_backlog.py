"""Backlogs go oldest first while new drops keep coming; lost events are found by
the rescan (README: File protocol)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

from support import ThreadedService, drop_by_rename, files_in, prediction, save_npy

from niftidrop.workers import THREADS_PER_PROCESS
from waiting import wait_until

BACKLOG = 400


class TestBacklog:
    def test_backlog_oldest_first_and_new_drops_picked_up(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Files waiting at start convert by modification time; a drop meanwhile converts too.

        Two worker threads share the conversion process, so an input may finish just
        before the one older than it (its thread was quicker to claim, or the other
        still finishing): each finishes within a few places of its age, never far."""
        order = list(range(BACKLOG))
        random.Random(4).shuffle(order)
        for age in order:
            path = save_npy(root / "inbox" / f"case_{age:04d}.npy", prediction(age))
            stamp = 1_700_000_000 + age
            os.utime(path, (stamp, stamp))
        service = start_service(root, workers=1)
        drop_by_rename(root / "inbox", "case_new.npy", prediction(1))
        wait_until(
            lambda: len(service.events("input_converted")) == BACKLOG + 1,
            timeout=90,
            what="the backlog and the new drop",
        )
        converted = [line["input"] for line in service.events("input_converted")]
        backlog = [name for name in converted if name != "case_new.npy"]
        assert sorted(backlog) == [f"case_{age:04d}.npy" for age in range(BACKLOG)]
        places = [abs(place - int(name[5:9])) for place, name in enumerate(backlog)]
        assert max(places) <= 2 * THREADS_PER_PROCESS
        assert "case_new.npy" in converted

    def test_files_without_events_are_found_by_the_periodic_rescan(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """With the watch gone (events lost), the rescan every rescan_interval finds files."""
        service = start_service(root, rescan_interval=0.5)
        watcher = service.service._watcher
        assert watcher is not None
        watcher.stop()
        drop_by_rename(root / "inbox", "case_silent.npy", prediction(2))
        save_npy(root / "inbox" / "sub" / "case_deep.npy", prediction(3))
        wait_until(
            lambda: files_in(root / "archive") == ["case_silent.npy", "sub/case_deep.npy"],
            what="both found by the rescan",
        )

    def test_new_subfolders_are_watched(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Files in a folder created (or moved in) after the start are converted."""
        service = start_service(root)
        staging = root / "staging" / "batch"
        save_npy(staging / "case_a.npy", prediction(4))
        staging.rename(root / "inbox" / "batch")  # a whole folder moved in at once
        (root / "inbox" / "new" / "deeper").mkdir(parents=True)
        drop_by_rename(root / "inbox", "new/deeper/case_b.npy", prediction(5))
        wait_until(lambda: len(service.events("input_converted")) == 2)
        assert files_in(root / "archive") == ["batch/case_a.npy", "new/deeper/case_b.npy"]
