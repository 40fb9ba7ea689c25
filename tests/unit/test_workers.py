"""Tests of the worker pool's queue, without starting its threads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from structlog.testing import capture_logs

from niftidrop.jobs import Job
from niftidrop.library import Match
from niftidrop.metrics import Metrics
from niftidrop.settings import Settings, load_settings
from niftidrop.spool import Spool
from niftidrop.workers import WorkerPool


def _resolve(name: str) -> Match:
    raise AssertionError("nothing is converted here")


def _convert_file(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("nothing is converted here")


def _pool(settings: Settings) -> WorkerPool:
    spool = Spool(settings)
    spool.create_folders()
    return WorkerPool(
        settings, spool, resolve=_resolve, metrics=Metrics(), convert_file=_convert_file
    )


class TestSubmit:
    def test_an_inbox_file_waits_once(self, tmp_path: Path) -> None:
        """The same inbox path submitted twice is one job; a truncated verdict for it
        is handed on regardless."""
        pool = _pool(load_settings(root=tmp_path, fsync=False, workers=1))
        path = pool.spool.inbox / "a.npy"
        pool.submit(Job(path), 1)
        pool.submit(Job(path), 2)
        assert (pool.outstanding, pool.queued(path)) == (1, True)
        pool.submit(Job(path, truncated=True), 0)
        assert pool.outstanding == 2

    def test_claims_left_by_a_crash_are_recovered(self, tmp_path: Path) -> None:
        """`recover` queues every claim found at start and logs spool_recovered."""
        settings = load_settings(root=tmp_path, fsync=False, workers=1)
        pool = _pool(settings)
        for name in ("a.npy", "b.npy"):
            path = pool.spool.inbox / name
            np.save(path, np.zeros(3))
            os.utime(path, (1000, 1000))
            assert pool.spool.claim(path) is not None
        with capture_logs() as logs:
            pool.recover()
        assert pool.outstanding == 2
        (line,) = [line for line in logs if line["event"] == "spool_recovered"]
        assert line["claims"] == 2
