"""Tests of the service's inbox side: what is noticed becomes a job once ready."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from structlog.testing import capture_logs

from niftidrop.intake import Intake
from niftidrop.metrics import Metrics
from niftidrop.settings import load_settings
from niftidrop.spool import Spool
from niftidrop.workers import WorkerPool


def _unused(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("nothing is converted here")


def _intake(tmp_path: Path, **options: Any) -> Intake:
    settings = load_settings(root=tmp_path, fsync=False, workers=1, **options)
    spool = Spool(settings)
    spool.create_folders()
    resolve: Any = _unused
    pool = WorkerPool(settings, spool, resolve=resolve, metrics=Metrics(), convert_file=_unused)
    return Intake(settings, spool, pool)


class TestRescan:
    def test_a_settled_complete_file_becomes_a_job(self, tmp_path: Path) -> None:
        """With settle_seconds 0 a complete input found by a rescan is queued at once."""
        intake = _intake(tmp_path, settle_seconds=0)
        path = intake.spool.inbox / "a.npy"
        np.save(path, np.zeros(3))
        intake.rescan()
        assert intake._pool.queued(path)
        assert len(intake) == 0

    def test_a_settling_file_waits(self, tmp_path: Path) -> None:
        """A file within its settle time is noticed, not yet queued."""
        intake = _intake(tmp_path, settle_seconds=60)
        path = intake.spool.inbox / "a.npy"
        np.save(path, np.zeros(3))
        intake.rescan()
        assert (len(intake), intake.paths(), intake._pool.outstanding) == (1, [path], 0)

    def test_a_fifo_is_ignored_and_reported(self, tmp_path: Path) -> None:
        """Anything but a regular file or a symlink is left alone, reported as input_ignored."""
        intake = _intake(tmp_path, settle_seconds=0)
        os.mkfifo(intake.spool.inbox / "pipe.npy")
        with capture_logs() as logs:
            intake.rescan()
        assert [line["input"] for line in logs if line["event"] == "input_ignored"] == ["pipe.npy"]
        assert intake._pool.outstanding == 0


class TestReportWaiting:
    def test_an_incomplete_file_is_reported_with_its_reason(self, tmp_path: Path) -> None:
        """A file shorter than its header declares is reported as incomplete, with its
        size and what the running service would do, and counted."""
        intake = _intake(tmp_path, settle_seconds=0)
        (intake.spool.inbox / "sub").mkdir()
        path = intake.spool.inbox / "sub" / "cut.npy"
        np.save(path, np.zeros(1000))
        os.truncate(path, 200)
        intake.rescan()
        with capture_logs() as logs:
            assert intake.report_waiting() == 1
        (line,) = logs
        assert (line["event"], line["input"]) == ("input_incomplete", "sub/cut.npy")
        assert line["reason"].startswith("incomplete: 200 bytes, fewer than a whole file needs")
        assert "truncated once it is unchanged for incomplete_timeout, 600 s" in line["reason"]
        assert path.exists()

    def test_a_file_still_changing_is_reported_as_being_written(self, tmp_path: Path) -> None:
        """A complete file not yet quiet for settle_seconds is reported as still being
        written, not as incomplete."""
        intake = _intake(tmp_path, settle_seconds=60)
        np.save(intake.spool.inbox / "a.npy", np.zeros(3))
        intake.rescan()
        with capture_logs() as logs:
            assert intake.report_waiting() == 1
        assert logs[0]["reason"].startswith("still being written: it changed 0.")
        assert "settle_seconds, 60 s" in logs[0]["reason"]

    def test_nothing_waiting_reports_nothing(self, tmp_path: Path) -> None:
        """No file waiting: no line, a count of 0."""
        intake = _intake(tmp_path, settle_seconds=0)
        with capture_logs() as logs:
            assert intake.report_waiting() == 0
        assert logs == []
