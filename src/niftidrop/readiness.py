"""When a candidate of the inbox may be read (README: File protocol).

`ReadinessTracker` decides, from sightings and `stat`, when a candidate is
complete and quiet (ready), or has been incomplete for too long (truncated); the
file itself is judged by `completeness.readiness`.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from niftidrop.arrays import file_kind
from niftidrop.completeness import Readiness, readiness

# The file's identity for the readiness check's memo: a change of any of these
# means its bytes may have changed.
_Identity = tuple[int, int, int, int, int]  # device, inode, size, mtime, ctime (ns)
# Longer than the timestamp granularity of any file system niftidrop runs on
# (Linux keeps file times in jiffies: 1 to 10 ms; NFS and SMB servers alike).
_TICK_SECONDS: Final = 0.05


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    changed_at: float  # monotonic time the size/mtime last changed (or first seen)
    finished: bool = False
    finished_stat: tuple[int, int] | None = None  # size/mtime when `finished` was seen
    seen: _Identity | None = None  # the identity at the last poll
    seen_at: float = 0.0  # monotonic time that identity was first seen
    checked: _Identity | None = None  # the identity `verdict` holds for
    verdict: Readiness | None = None


@dataclass
class Verdicts:
    """What one `ReadinessTracker.poll` decided."""

    ready: list[tuple[Path, int]] = field(default_factory=list)  # (path, mtime_ns)
    truncated: list[Path] = field(default_factory=list)
    waiting: list[Path] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)


class ReadinessTracker:
    """When may a candidate be read? (README: File protocol)

    Ready: structurally complete (`completeness.readiness`) and either its last event
    was a close-after-write or a rename into the inbox, or its size and mtime have
    not changed for `settle_seconds`. Truncated: still incomplete and unchanged
    after `incomplete_timeout`. A quiet file that can never become complete (not a
    .npy / .npz, a header that does not parse, pickled objects) is handed on at
    once to fail as corrupt, rather than after `incomplete_timeout`; so is one the
    service cannot open (permissions: the conversion retries it as transient). A
    symlink is "ready" at once, to be refused as unsafe unopened. Anything else
    that is not a regular file (FIFO, socket, device, folder) is ignored: reported
    once, left untouched, and not reported again while the same file is there.

    The check reads headers and zip directories on the caller's thread, so its
    verdict is kept while the file's identity (inode, size, mtime, ctime) stays
    as it was; it is taken again only when the file changes or is seen again.
    """

    def __init__(
        self,
        *,
        settle_seconds: float,
        incomplete_timeout: float,
        check: Callable[[Path], Readiness] = readiness,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settle_seconds = settle_seconds
        self.incomplete_timeout = incomplete_timeout
        self._check = check
        self._clock = clock
        self._wall_clock = wall_clock
        self._pending: dict[Path, _Pending] = {}
        # What was reported as ignored: path -> (device, inode, ctime), so that a
        # rescan does not report it again but a new file of that name is news.
        self._ignored: dict[Path, tuple[int, int, int]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, path: object) -> bool:
        return path in self._pending

    def note(self, path: Path, *, finished: bool) -> None:
        """Record a sighting of `path` (cheap: the disk is read by `poll`); `finished`:
        its last event was a close-after-write or a rename into the inbox."""
        pending = self._pending.get(path)
        if pending is None:
            pending = _Pending(size=-1, mtime_ns=-1, changed_at=self._clock())
            self._pending[path] = pending
        pending.verdict = None  # an event: its bytes may have changed
        if finished:
            pending.finished = True
            pending.finished_stat = None
        elif pending.finished:
            pending.finished = False  # written again after it was closed

    def paths(self) -> list[Path]:
        """The candidates still waiting."""
        return list(self._pending)

    def forget(self, path: Path) -> None:
        self._pending.pop(path, None)

    def poll(self, paths: list[Path] | None = None) -> Verdicts:
        """Decide on the pending candidates (all, or `paths`); decided ones are forgotten."""
        verdicts = Verdicts()
        now = self._clock()
        wall = self._wall_clock()
        for path in list(self._pending) if paths is None else paths:
            pending = self._pending.get(path)
            if pending is None:
                continue
            decision = self._decide(path, pending, now, wall)
            if decision == "waiting":
                verdicts.waiting.append(path)
                continue
            del self._pending[path]
            if decision == "ready":
                verdicts.ready.append((path, pending.mtime_ns))
            elif decision == "truncated":
                verdicts.truncated.append(path)
            elif decision != "gone":
                verdicts.ignored.append((path, decision))
        return verdicts

    def _decide(self, path: Path, pending: _Pending, now: float, wall: float) -> str:
        """ "ready", "truncated", "waiting", "gone", or why it is ignored."""
        try:
            info = path.lstat()
        except (OSError, ValueError):
            return "gone"
        if not stat.S_ISREG(info.st_mode):
            return self._not_regular(path, pending, info)
        self._ignored.pop(path, None)  # a regular file now: a later special one is news
        current = (info.st_size, info.st_mtime_ns)
        if current != (pending.size, pending.mtime_ns):
            if pending.size >= 0:
                pending.changed_at = now
            pending.size, pending.mtime_ns = current
        if pending.finished:
            if pending.finished_stat is None:
                pending.finished_stat = current
            elif pending.finished_stat != current:
                pending.finished = False  # changed after the close: wait for quiet again
        # mtime is when the last write happened, so an old mtime is already quiet
        # time (a backlog is ready at once); `changed_at` covers skewed clocks.
        quiet = max(now - pending.changed_at, wall - info.st_mtime_ns / 1e9)
        settled = quiet >= self.settle_seconds
        verdict = self._readiness(path, pending, info, now)
        if verdict in (Readiness.COMPLETE, Readiness.UNREADABLE):
            return "ready" if pending.finished or settled else "waiting"
        if verdict is Readiness.NEVER:
            return "ready" if settled else "waiting"  # no writer makes it whole: refused now
        if verdict is Readiness.CHANGED:
            return "waiting"  # replaced since the lstat: the next poll looks again
        return "truncated" if quiet >= self.incomplete_timeout else "waiting"

    def _readiness(
        self, path: Path, pending: _Pending, info: os.stat_result, now: float
    ) -> Readiness:
        """The check's verdict, reused while the file stays as it was.

        A verdict is kept only when the check ran at least `_TICK_SECONDS` after
        the identity was first seen: a write in the same timestamp tick as that
        first sighting leaves the identity unchanged, but any write after such a
        check falls in a later tick and changes the mtime.
        """
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if identity != pending.seen:
            pending.seen, pending.seen_at = identity, now
        if pending.verdict is not None and pending.checked == identity:
            return pending.verdict
        verdict = self._check(path)
        if now - pending.seen_at >= _TICK_SECONDS:
            pending.verdict, pending.checked = verdict, identity
        return verdict

    def _not_regular(self, path: Path, pending: _Pending, info: os.stat_result) -> str:
        if stat.S_ISLNK(info.st_mode):
            pending.mtime_ns = info.st_mtime_ns
            return "ready"  # refused as unsafe_input, never followed
        inode = (info.st_dev, info.st_ino, info.st_ctime_ns)
        if self._ignored.get(path) == inode:
            return "gone"  # reported already
        self._ignored[path] = inode
        return f"not a regular file but a {file_kind(info.st_mode)}"
