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
