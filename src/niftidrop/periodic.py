"""The periodic tasks of the service's main loop (README: Logs, Deployment).

The main loop sleeps until the first of its tasks is due (or a tick passes),
then runs every task that is due: a readiness check of settling files, the
retries, the inbox rescan, the heartbeat, the systemd watchdog ping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Task(Protocol):
    """A periodic task of the main loop."""

    def when(self) -> float:
        """When it is due next (infinity: not now)."""
        ...

    def run(self, now: float) -> None:
        """Do it if it is due at `now`."""
        ...


def _always() -> bool:
    return True


def _never() -> bool:
    return False


@dataclass
class Periodic:
    """`action` every `interval` seconds from `due` on, while `wanted()`; at the next
    tick, due or not, when `asked()`."""

    action: Callable[[], object]
    interval: float
    due: float
    wanted: Callable[[], bool] = _always
    asked: Callable[[], bool] = _never

    def when(self) -> float:
        return self.due if self.wanted() else math.inf

    def run(self, now: float) -> None:
        if self.asked() or (self.wanted() and now >= self.due):
            self.action()
            self.due = now + self.interval
