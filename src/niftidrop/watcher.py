"""Watching the inbox (README: File protocol).

`InboxWatcher` turns file-system events into `(path, Seen)` sightings on a
queue (inotify, or watchdog's polling observer on network file systems); the
event threads do nothing else. Which names are candidates is `names.is_candidate`;
when a sighted file is ready to be read, `readiness.ReadinessTracker`; the full
rescan, the safety net for lost events, `listing.scan_inbox`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Final

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from niftidrop import inotify
from niftidrop.names import is_candidate

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

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
        self._recursive = recursive
        self._poll_interval = poll_interval
        self._polling: BaseObserver | None = None
        # What the event thread uses: where sightings go, which names count, when to stop.
        self._sightings = sightings
        self._accept = accept
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._inotify: inotify.Inotify | None = None
        self._folders_by_wd: dict[int, Path] = {}

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
