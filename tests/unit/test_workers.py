"""Tests of the worker pool: its queue (without starting its threads), and how its
conversion processes are lent to the worker threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from niftidrop.jobs import Job
from niftidrop.library import Match
from niftidrop.metrics import Metrics
from niftidrop.processes import ConversionCrashed
from niftidrop.settings import Settings, load_settings
from niftidrop.spool import Spool
from niftidrop.workers import SharedProcesses, WorkerPool
from waiting import wait_until


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


class _Gate:
    """A conversion process stand-in that records its calls and holds each one until
    its gate opens (SharedProcesses only calls what it lends)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate = threading.Event()

    def __call__(self, name: str) -> str:
        self.calls.append(name)
        self.gate.wait(timeout=30)
        return name


class TestSharedProcesses:
    def test_the_oldest_waiting_job_is_lent_the_next_process(self) -> None:
        """While the one process converts, jobs queue for it in any order; they are
        lent it oldest first (by their priority in the queue), each in turn."""
        process = _Gate()
        shared = SharedProcesses([process])  # type: ignore[list-item]
        results: list[str] = []

        def convert(priority: tuple[int, int], name: str) -> None:
            results.append(shared.converter(priority)(name))

        first = threading.Thread(target=convert, args=((5, 0), "first"))
        first.start()
        wait_until(lambda: process.calls == ["first"], what="the first conversion")
        waiting = [((9, 2), "newest"), ((1, 3), "oldest"), ((3, 1), "middle")]
        threads = [threading.Thread(target=convert, args=job) for job in waiting]
        for number, thread in enumerate(threads, start=1):
            thread.start()
            wait_until(lambda n=number: shared.waiting == n, what="the job to wait")
        assert shared.busy() == [process]
        process.gate.set()
        for thread in [first, *threads]:
            thread.join(timeout=30)
        assert process.calls == ["first", "oldest", "middle", "newest"]
        assert results == process.calls
        assert (shared.busy(), shared.waiting) == ([], 0)

    def test_no_process_is_lent_after_a_stop(self) -> None:
        """A job waiting when lending stops, and one asking afterwards, fail as crashed
        (at a stop their inputs stay claimed); the conversion under way ends as usual."""
        process = _Gate()
        shared = SharedProcesses([process])  # type: ignore[list-item]
        errors: list[BaseException] = []

        def convert(priority: tuple[int, int], name: str) -> None:
            try:
                shared.converter(priority)(name)
            except ConversionCrashed as error:
                errors.append(error)

        busy = threading.Thread(target=convert, args=((1, 0), "busy"))
        busy.start()
        wait_until(lambda: process.calls == ["busy"], what="the conversion")
        waiter = threading.Thread(target=convert, args=((2, 1), "waiter"))
        waiter.start()
        wait_until(lambda: shared.waiting == 1, what="the job to wait")
        shared.stop_lending()
        waiter.join(timeout=30)
        with pytest.raises(ConversionCrashed, match="stopping"):
            shared.converter((3, 2))("late")
        process.gate.set()
        busy.join(timeout=30)
        assert process.calls == ["busy"]
        assert len(errors) == 1

    def test_a_process_is_lent_to_calls_in_flight_jobs_the_least_busy_first(self) -> None:
        """With two calls in flight, two processes take four jobs, two each (the least
        busy is lent first); a fifth waits until one gives its place back."""
        processes = [_Gate(), _Gate()]
        shared = SharedProcesses(processes, calls_in_flight=2)  # type: ignore[arg-type]
        threads = [
            threading.Thread(target=shared.converter((n, n)), args=(f"job{n}",)) for n in range(5)
        ]
        for thread in threads[:2]:
            thread.start()
        wait_until(
            lambda: [len(process.calls) for process in processes] == [1, 1],
            what="one job in each process",
        )
        for thread in threads[2:4]:
            thread.start()
        wait_until(
            lambda: [len(process.calls) for process in processes] == [2, 2],
            what="two jobs in each process",
        )
        threads[4].start()
        wait_until(lambda: shared.waiting == 1, what="the fifth job to wait")
        assert shared.busy() == processes
        for process in processes:
            process.gate.set()
        for thread in threads:
            thread.join(timeout=30)
        assert sum(len(process.calls) for process in processes) == 5
        assert (shared.busy(), shared.waiting) == ([], 0)
