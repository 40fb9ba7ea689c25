"""Watching the inbox (README: File protocol): which files are candidates, and when
each one is ready to be read.

Three pieces, each small:
- `CandidateFilter` says which names niftidrop may touch at all.
- `InboxWatcher` turns file-system events into `(path, Seen)` sightings on a
  queue (inotify, or watchdog's polling observer on network file systems); the
  event threads do nothing else.
- `ReadinessTracker` decides, from sightings and `stat`, when a candidate is
  complete and quiet (ready), or has been incomplete for too long (truncated).
`scan_inbox` is the full rescan, the safety net for lost events.
"""

from __future__ import annotations

import contextlib
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Final

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from niftidrop import inotify
from niftidrop.arrays import file_kind
from niftidrop.completeness import Readiness, readiness
from niftidrop.library import needs_polling
from niftidrop.names import Limits

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

INPUT_SUFFIXES: Final = (".npy", ".npz")
IGNORED_ENDINGS: Final = (".tmp", ".part", ".partial", ".crdownload", "~")

# What the inbox watch asks inotify for. IN_MODIFY is left out on purpose: a
# finished write is IN_CLOSE_WRITE, and quiet-time checks use stat(), so one
# event per write() would only cost CPU.
_INBOX_EVENTS: Final = (
    inotify.IN_CREATE
    | inotify.IN_CLOSE_WRITE
    | inotify.IN_MOVED_TO
    | inotify.IN_MOVED_FROM
    | inotify.IN_DELETE_SELF
    | inotify.IN_MOVE_SELF
)


class Seen(Enum):
    """What an event says about a path."""

    WRITTEN = "written"  # created or changed: complete only after quiet time
    FINISHED = "finished"  # closed after writing, or renamed into the inbox
    FOLDER = "folder"  # a folder whose content may be new: scan it


Sighting = tuple[Path, Seen]
# An entry of a folder listing: name, whether it is a folder, its (device, inode).
_Entry = tuple[str, bool, tuple[int, int] | None]
_LIST_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CandidateFilter:
    """Whether a file name is a niftidrop input (README: File protocol): `*.npy`/`*.npz` in any
    case, never hidden, never a temporary or partial download name."""

    def __init__(
        self,
        suffixes: tuple[str, ...] = INPUT_SUFFIXES,
        ignored_endings: tuple[str, ...] = IGNORED_ENDINGS,
    ) -> None:
        self.suffixes = tuple(suffix.lower() for suffix in suffixes)
        self.ignored_endings = tuple(ending.lower() for ending in ignored_endings)

    def __call__(self, name: str) -> bool:
        lowered = name.lower()
        return (
            not name.startswith(".")
            and lowered.endswith(self.suffixes)
            and not lowered.endswith(self.ignored_endings)
        )

    def __repr__(self) -> str:
        return (
            f"CandidateFilter(suffixes={list(self.suffixes)}, "
            f"hidden=False, ignored_endings={list(self.ignored_endings)})"
        )


is_candidate = CandidateFilter()


def scan_inbox(
    folder: Path,
    *,
    recursive: bool,
    accept: Callable[[str], bool] = is_candidate,
    unreachable: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Every candidate under `folder`. Hidden folders (the state folder among them)
    and symlinked folders are not entered; symlinked files are yielded (they are
    refused as unsafe_input, which the user should see).

    Never raises, whatever the tree holds: the walk is a loop, not a recursion;
    each folder is listed through a descriptor opened without following a
    symlink and checked to be the folder its parent listed, so a subfolder
    swapped for a symlink while the scan runs is not listed. A path as long as
    the system's path limit cannot be used by anyone: the file or folder there is
    handed to `unreachable` (folders are not entered) instead of being yielded.
    """
    path_max = Limits.of(folder).path_max
    pending: list[tuple[Path, tuple[int, int] | None]] = [(folder, None)]
    while pending:
        here, identity = pending.pop()
        for name, is_folder, found in _list_folder(here, identity):
            path = here / name
            if len(os.fsencode(path)) >= path_max:  # the limit counts the closing NUL
                if (is_folder or accept(name)) and unreachable is not None:
                    unreachable(path)
            elif is_folder:
                if recursive:
                    pending.append((path, found))
            elif accept(name):
                yield path


def _list_folder(folder: Path, identity: tuple[int, int] | None) -> list[_Entry]:
    """The visible entries of `folder` as (name, is a folder, its (device, inode) if a
    folder); nothing if it cannot be listed, is a symlink, or is no longer the
    folder (`identity`) its parent listed."""
    try:
        descriptor = os.open(folder, _LIST_FLAGS)
    except OSError:
        return []
    try:
        if identity is not None:
            info = os.fstat(descriptor)
            if (info.st_dev, info.st_ino) != identity:
                return []
        found: list[_Entry] = []
        # Everything is read while the descriptor is open: entries of a descriptor's
        # listing stat through it.
        with os.scandir(descriptor) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        found.append((entry.name, True, (info.st_dev, info.st_ino)))
                    else:
                        found.append((entry.name, False, None))
        return found
    except OSError:
        return []
    finally:
        os.close(descriptor)


def choose_observer(kind: str, folder: Path) -> str:
    """`inotify` or `polling` for `observer = kind` (`auto`: polling on network/FUSE)."""
    if kind == "auto":
        return "polling" if needs_polling(folder) else "inotify"
    return kind


class InboxWatcher:
    """Reports candidate files of the inbox as `(path, Seen)` sightings on `sightings`.

    `Seen.FOLDER` means "its content may be new: scan it" (a new subfolder, or the
    kernel's queue overflowed and events were lost).
    """

    def __init__(
        self,
        folder: Path,
        sightings: queue.SimpleQueue[Sighting],
        *,
        recursive: bool = True,
        observer: str = "inotify",
        poll_interval: float = 1.0,
        accept: Callable[[str], bool] = is_candidate,
    ) -> None:
        self.folder = folder
        self.kind = observer
        self._sightings = sightings
        self._recursive = recursive
        self._poll_interval = poll_interval
        self._accept = accept
        self._thread: threading.Thread | None = None
        self._inotify: inotify.Inotify | None = None
        self._folders_by_wd: dict[int, Path] = {}
        self._stopping = threading.Event()
        self._polling: BaseObserver | None = None

    def __repr__(self) -> str:
        return f"InboxWatcher({str(self.folder)!r}, observer={self.kind!r})"

    # Life cycle.

    def start(self) -> None:
        """Start watching; when this returns, the watch is live.

        Raises OSError when the folder cannot be watched (it is missing, say).
        """
        self._stopping.clear()
        if self.kind == "polling":
            self._start_polling()
            return
        self._inotify = inotify.Inotify()
        try:
            self._watch_tree(self.folder)
        except OSError:
            self._inotify.close()
            self._inotify = None
            raise
        self._thread = threading.Thread(
            target=self._read_events, name="niftidrop-inbox-watch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._inotify is not None:
            self._inotify.wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._folders_by_wd.clear()
        if self._polling is not None:
            self._polling.stop()
            self._polling.join()
            self._polling = None

    # inotify.

    def _watch_tree(self, folder: Path) -> None:
        """Watch `folder` and (if recursive) its visible subfolders."""
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(os.fsencode(folder), _INBOX_EVENTS)
        except OSError:
            if folder == self.folder:
                raise
            return  # removed or replaced meanwhile: the rescan will see it
        self._folders_by_wd[wd] = folder
        if not self._recursive:
            return
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                self._watch_tree(Path(entry.path))

    def _forget_tree(self, folder: Path) -> None:
        """Drop the watches of `folder` and below (it moved away or was deleted)."""
        assert self._inotify is not None
        for wd, path in list(self._folders_by_wd.items()):
            if path == folder or folder in path.parents:
                del self._folders_by_wd[wd]
                self._inotify.remove_watch(wd)

    def _read_events(self) -> None:
        assert self._inotify is not None
        while not self._stopping.is_set():
            for event in self._inotify.read():
                self._handle(event)

    def _handle(self, event: inotify.RawEvent) -> None:
        if event.mask & inotify.IN_Q_OVERFLOW:
            self._sightings.put((self.folder, Seen.FOLDER))  # events were lost: rescan all
            return
        folder = self._folders_by_wd.get(event.wd)
        if folder is None:
            return
        if event.mask & inotify.IN_IGNORED or not event.name:
            if event.mask & (inotify.IN_IGNORED | inotify.IN_DELETE_SELF):
                self._folders_by_wd.pop(event.wd, None)
            return
        name = os.fsdecode(event.name)
        if name.startswith("."):
            return  # hidden: never touched (and the state folder lives here)
        path = folder / name
        if event.is_dir:
            if event.mask & inotify.IN_MOVED_FROM:
                self._forget_tree(path)
            elif self._recursive and event.mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO):
                # Watch first, then scan: files written before the watch existed
                # are found by the scan, later ones by their events.
                self._watch_tree(path)
                self._sightings.put((path, Seen.FOLDER))
            return
        if not self._accept(name) or event.mask & inotify.IN_MOVED_FROM:
            return
        finished = event.mask & (inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO)
        self._sightings.put((path, Seen.FINISHED if finished else Seen.WRITTEN))

    # Polling (network and FUSE file systems).

    def _start_polling(self) -> None:
        from watchdog.observers.polling import PollingObserver

        observer = PollingObserver(timeout=self._poll_interval)
        observer.schedule(
            _PollingHandler(self.folder, self._sightings, self._accept),
            str(self.folder),
            recursive=self._recursive,
        )
        observer.start()
        self._polling = observer


class _PollingHandler(FileSystemEventHandler):
    """Runs on the polling observer's thread, so it only queues sightings.

    Hidden names are judged below `folder` only: the inbox itself may well lie
    under a hidden folder (`~/.local/share/...`).
    """

    def __init__(
        self,
        folder: Path,
        sightings: queue.SimpleQueue[Sighting],
        accept: Callable[[str], bool],
    ) -> None:
        self._folder = folder
        self._sightings = sightings
        self._accept = accept

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("created", "modified", "moved"):
            return
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        path = Path(os.fsdecode(raw))
        try:
            inside = path.relative_to(self._folder).parts
        except ValueError:
            return  # not below the watched folder: nothing of the inbox
        if any(part.startswith(".") for part in inside):
            return
        if event.is_directory:
            if event.event_type != "modified":
                self._sightings.put((path, Seen.FOLDER))
        elif self._accept(path.name):
            # Polling sees no close events: readiness comes from quiet time.
            self._sightings.put((path, Seen.WRITTEN))


# Readiness.

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

    Ready: structurally complete (`arrays.readiness`) and either its last event
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
