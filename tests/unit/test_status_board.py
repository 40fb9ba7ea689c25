"""Tests for niftidrop.status_board: what the status page keeps in memory, on a real spool."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from niftidrop.claims import Claim, Converted, Failed
from niftidrop.spool import Spool
from niftidrop.status_board import FAILED_LIMIT, RECENT_LIMIT, StatusBoard
from waiting import wait_until


def add_failed(spool: Spool, name: str, failed_at: str, code: str = "corrupt") -> Path:
    """An input in failed with its `.error.json`, as the service leaves them."""
    path = spool.failed_folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    record = {"input": name, "error": code, "message": f"{name}: bad", "failed_at": failed_at}
    path.with_name(path.name + ".error.json").write_text(json.dumps(record))
    return path


def converted(spool: Spool, stem: str, *, preview: bool = False) -> Converted:
    """The outcome of converting `<stem>.npy`, its output (and preview) in the outbox."""
    output = spool.outbox / f"{stem}.nii.gz"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(b"nifti")
    if preview:
        output.with_name(f"{Path(stem).name}.png").write_bytes(b"png")
    archived = spool.archive_folder / f"{stem}.npy"
    archived.parent.mkdir(parents=True, exist_ok=True)
    archived.write_bytes(b"x")
    summary = {"input": f"{stem}.npy", "output": str(output), "shape": [2, 3, 4], "seconds": 0.5}
    claim = Claim(spool.claims_folder / "token", PurePosixPath(f"{stem}.npy"))
    return Converted(claim, summary, archived)


def failed(spool: Spool, name: str, failed_at: str = "2026-01-01T00:00:00Z") -> Failed:
    """The outcome of rejecting `name`, moved to failed."""
    path = add_failed(spool, name, failed_at)
    record = json.loads(path.with_name(path.name + ".error.json").read_text())
    return Failed(Claim(spool.claims_folder / "token", PurePosixPath(name)), record, path)


@pytest.fixture
def board(spool: Spool) -> Iterator[StatusBoard]:
    """A board of `spool` that only counts when told to (its thread never started)."""
    instance = StatusBoard(spool, quick_interval=3600, full_interval=3600)
    yield instance
    instance.stop()


def names(entries: list[dict[str, Any]], key: str = "input") -> list[Any]:
    return [entry[key] for entry in entries]


class TestLoad:
    def test_counts_every_folder(self, spool: Spool, board: StatusBoard) -> None:
        """At start every folder is counted, as `status` counts it."""
        (spool.inbox / "waiting.npy").write_bytes(b"x")
        converted(spool, "a")
        add_failed(spool, "b.npy", "2026-01-01T00:00:00Z")
        board.load()
        assert board.snapshot().counts == spool.counts()

    def test_failed_records_are_read_newest_first(self, spool: Spool, board: StatusBoard) -> None:
        """The failed folder's records are read once, shown newest first."""
        add_failed(spool, "old.npy", "2026-01-01T00:00:00Z", "corrupt")
        add_failed(spool, "site/new.npy", "2026-02-01T00:00:00Z", "no_reference")
        board.load()
        shown = board.snapshot().failed
        assert names(shown, "name") == ["site/new.npy", "old.npy"]
        assert names(shown, "error") == ["no_reference", "corrupt"]
        assert shown[0]["message"] == "site/new.npy: bad"

    def test_only_the_newest_failures_are_kept(self, spool: Spool, board: StatusBoard) -> None:
        """Of more than FAILED_LIMIT failed inputs the newest are kept; the count is exact."""
        for number in range(FAILED_LIMIT + 5):
            path = add_failed(spool, f"f{number:04d}.npy", f"2026-01-01T00:00:{number:04d}Z")
            error = path.with_name(path.name + ".error.json")
            os.utime(error, (1000.0 + number, 1000.0 + number))
        board.load()
        snapshot = board.snapshot()
        assert snapshot.counts["failed"] == FAILED_LIMIT + 5
        assert len(snapshot.failed) == FAILED_LIMIT
        assert snapshot.failed[0]["name"] == f"f{FAILED_LIMIT + 4:04d}.npy"
        assert "f0000.npy" not in names(snapshot.failed, "name")

    def test_a_failed_input_without_record_is_shown(self, spool: Spool, board: StatusBoard) -> None:
        """An input in failed whose `.error.json` is missing is listed by its name."""
        (spool.failed_folder / "bare.npy").write_bytes(b"x")
        board.load()
        [entry] = board.snapshot().failed
        assert entry["input"] == "bare.npy"
        assert entry["error"] == ""


class TestRecord:
    def test_conversions_newest_first_and_bounded(self, spool: Spool, board: StatusBoard) -> None:
        """Recent conversions are newest first, at most RECENT_LIMIT of them."""
        board.load()
        for number in range(RECENT_LIMIT + 3):
            board.record(converted(spool, f"c{number}"))
        recent = board.snapshot().recent
        assert len(recent) == RECENT_LIMIT
        assert recent[0]["input"] == f"c{RECENT_LIMIT + 2}.npy"
        assert recent[-1]["input"] == "c3.npy"
        assert recent[0]["converted_at"].endswith("Z")

    def test_own_moves_are_counted_at_once(self, spool: Spool, board: StatusBoard) -> None:
        """A conversion counts in archive and outbox, a failure in failed, before any walk."""
        board.load()
        board.record(converted(spool, "a", preview=True))
        board.record(failed(spool, "b.npy"))
        counts = board.snapshot().counts
        assert (counts["archive"], counts["outbox"], counts["failed"]) == (1, 2, 1)
        assert counts == spool.counts()

    def test_a_failure_is_listed_at_once(self, spool: Spool, board: StatusBoard) -> None:
        """The service's own failure is at the top of the failed list."""
        add_failed(spool, "old.npy", "2026-01-01T00:00:00Z")
        board.load()
        board.record(failed(spool, "<b>new.npy", "2026-03-01T00:00:00Z"))
        assert names(board.snapshot().failed, "name") == ["<b>new.npy", "old.npy"]

    def test_preview_recorded_when_the_png_is_there(self, spool: Spool, board: StatusBoard) -> None:
        """A conversion whose `<stem>.png` is beside its output names it; others name none."""
        board.record(converted(spool, "site/with", preview=True))
        board.record(converted(spool, "without"))
        recent = board.snapshot().recent
        assert names(recent, "preview") == [None, "site/with.png"]
        assert board.preview("site/with.png") == spool.outbox / "site" / "with.png"

    def test_the_preview_the_conversion_names_is_shown(
        self, spool: Spool, board: StatusBoard
    ) -> None:
        """`split` outputs (`case_c0.nii.gz`) share one `case.png`, which the summary
        names: that is the one shown; a named file outside the outbox never is."""
        for channel in (0, 1):
            (spool.outbox / f"case_c{channel}.nii.gz").write_bytes(b"nifti")
        (spool.outbox / "case.png").write_bytes(b"png")
        outputs = [str(spool.outbox / f"case_c{channel}.nii.gz") for channel in (0, 1)]
        claim = Claim(spool.claims_folder / "token", PurePosixPath("case.npy"))
        summary = {
            "input": "case.npy",
            "output": outputs,
            "preview": str(spool.outbox / "case.png"),
        }
        board.record(Converted(claim, summary, None))
        outside = spool.archive_folder / "x.png"
        outside.parent.mkdir(parents=True, exist_ok=True)
        outside.write_bytes(b"png")
        board.record(Converted(claim, {**summary, "preview": str(outside)}, None))
        assert names(board.snapshot().recent, "preview") == [None, "case.png"]

    def test_previews_are_looked_up_never_joined(self, spool: Spool, board: StatusBoard) -> None:
        """Only a recorded name gives a path: a file in the outbox by any other name does not."""
        board.record(converted(spool, "a", preview=True))
        (spool.outbox / "other.png").write_bytes(b"png")
        for name in ("other.png", "./a.png", "../outbox/a.png", str(spool.outbox / "a.png")):
            assert board.preview(name) is None

    def test_a_preview_leaves_with_its_conversion(self, spool: Spool, board: StatusBoard) -> None:
        """Once its conversion drops off the recent list its preview is not served."""
        board.record(converted(spool, "first", preview=True))
        for number in range(RECENT_LIMIT):
            board.record(converted(spool, f"c{number}"))
        assert board.preview("first.png") is None


class TestRecount:
    def test_a_full_count_follows_other_hands(self, spool: Spool, board: StatusBoard) -> None:
        """Inputs retried (gone from failed) leave the list; ones moved in by others join it."""
        gone = add_failed(spool, "gone.npy", "2026-01-01T00:00:00Z")
        board.load()
        gone.unlink()
        add_failed(spool, "arrived.npy", "2026-01-02T00:00:00Z")
        board._count(full=True)
        snapshot = board.snapshot()
        assert names(snapshot.failed, "name") == ["arrived.npy"]
        assert snapshot.counts["failed"] == 1

    def test_the_thread_keeps_the_inbox_count_current(self, spool: Spool) -> None:
        """Started, the board counts every folder, then the inbox every quick interval
        and the others every full interval."""
        board = StatusBoard(spool, quick_interval=0.05, full_interval=0.2)
        assert set(board.snapshot().counts.values()) == {None}  # not counted yet
        board.start()
        try:
            wait_until(lambda: board.snapshot().counts["inbox"] == 0, 10, "first count")
            (spool.inbox / "new.npy").write_bytes(b"x")
            wait_until(lambda: board.snapshot().counts["inbox"] == 1, 10, "inbox counted")
            (spool.archive_folder / "by_hand.npy").write_bytes(b"x")
            wait_until(lambda: board.snapshot().counts["archive"] == 1, 10, "archive counted")
        finally:
            board.stop()
        board.stop()  # a second stop is harmless

    def test_a_count_between_walks_is_quick(self, spool: Spool, board: StatusBoard) -> None:
        """A quick count walks inbox and claims only: archive keeps its number."""
        board.load()
        (spool.archive_folder / "by_hand.npy").write_bytes(b"x")
        (spool.inbox / "new.npy").write_bytes(b"x")
        board._count(full=False)
        counts = board.snapshot().counts
        assert (counts["inbox"], counts["archive"]) == (1, 0)

    def test_own_moves_before_the_first_count_are_left_to_it(
        self, spool: Spool, board: StatusBoard
    ) -> None:
        """An outcome before the first count leaves the counts None; the count has it."""
        board.record(converted(spool, "early"))
        assert board.snapshot().counts["archive"] is None
        board.load()
        assert board.snapshot().counts["archive"] == 1
