"""Tests of the main loop's periodic tasks."""

from __future__ import annotations

import math

from niftidrop.periodic import Periodic


class TestPeriodic:
    def test_runs_once_due_then_every_interval(self) -> None:
        """Not before `due`; at `due`; then again `interval` after it ran."""
        runs: list[int] = []
        task = Periodic(lambda: runs.append(1), interval=5.0, due=10.0)
        task.run(9.0)
        assert (runs, task.when()) == ([], 10.0)
        task.run(10.5)
        assert (runs, task.when()) == ([1], 15.5)

    def test_an_unwanted_task_is_neither_waited_for_nor_run(self) -> None:
        """While `wanted()` is false it is never due."""
        runs: list[int] = []
        task = Periodic(lambda: runs.append(1), interval=1.0, due=0.0, wanted=lambda: False)
        task.run(100.0)
        assert (runs, task.when()) == ([], math.inf)

    def test_an_asked_task_runs_at_once(self) -> None:
        """`asked()` runs it at the next tick, due or not, wanted or not."""
        runs: list[int] = []
        task = Periodic(
            lambda: runs.append(1), 30.0, due=50.0, wanted=lambda: False, asked=lambda: True
        )
        task.run(1.0)
        assert runs == [1]
        assert task.due == 31.0
