"""A minimal Linux inotify(7) reader that reports every event the moment it is read.

Why not watchdog's inotify observer for the inbox: it holds each IN_MOVED_FROM
for half a second hoping to pair it with an IN_MOVED_TO, and every event queued
behind it waits too. niftidrop itself moves files out of watched folders (every
claim), so that pairing delay would add ~500 ms to the next drop's latency. The
inbox watcher needs no pairing: a file moved in is simply "finished", a file
moved out is of no interest. (watchdog's polling observer is still used on
network file systems, where inotify sees nothing.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import struct
from dataclasses import dataclass
from typing import Final

# Events a watch asks for.
IN_MODIFY: Final = 0x00000002
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
# Flags of inotify_init1 and of inotify_add_watch.
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
IN_ONLYDIR: Final = 0x01000000
IN_DONT_FOLLOW: Final = 0x02000000
# Set by the kernel in the events it reports.
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ISDIR: Final = 0x40000000

_EVENT_HEADER: Final = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
_READ_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class RawEvent:
    """One inotify event: the watch it came from, what happened, and the entry name."""

    wd: int
    mask: int
    cookie: int
    name: bytes

    @property
    def is_dir(self) -> bool:
        return bool(self.mask & IN_ISDIR)


def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c") or "libc.so.6"
    return ctypes.CDLL(name, use_errno=True)


def _check(result: int, what: str, path: bytes = b"") -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", os.fsdecode(path) or None)
    return result


def parse_events(buffer: bytes) -> list[RawEvent]:
    """The events packed in one read() of an inotify descriptor."""
    events = []
    offset = 0
    while offset + _EVENT_HEADER.size <= len(buffer):
        wd, mask, cookie, length = _EVENT_HEADER.unpack_from(buffer, offset)
        start = offset + _EVENT_HEADER.size
        name = buffer[start : start + length].rstrip(b"\0")
        events.append(RawEvent(wd, mask, cookie, name))
        offset = start + length
    return events


class Inotify:
    """An inotify descriptor plus a wake-up pipe so a blocked `read` can be interrupted."""

    def __init__(self) -> None:
        self._lib = _libc()
        self._fd = _check(self._lib.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC), "inotify_init1")
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self._poller.register(self._wake_read, select.POLLIN)
        self.closed = False

    def add_watch(self, path: bytes, mask: int) -> int:
        """Watch directory `path` (never following a symlink); returns the watch id."""
        flags = mask | IN_ONLYDIR | IN_DONT_FOLLOW
        return _check(self._lib.inotify_add_watch(self._fd, path, flags), "inotify_add_watch", path)

    def remove_watch(self, wd: int) -> None:
        """Stop a watch; a watch the kernel already dropped is not an error."""
        self._lib.inotify_rm_watch(self._fd, wd)

    def read(self, timeout: float | None = None) -> list[RawEvent]:
        """Events available now, waiting up to `timeout` (None: until some or `wake`)."""
        if self.closed:
            return []
        ready = self._poller.poll(None if timeout is None else int(timeout * 1000))
        if not ready:
            return []
        if any(fd == self._wake_read for fd, _ in ready):
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 64)  # drained, so the next read blocks again
            return []
        try:
            return parse_events(os.read(self._fd, _READ_BYTES))
        except BlockingIOError:
            return []

    def wake(self) -> None:
        """Make a blocked `read` return (from another thread)."""
        # A full or closed pipe means the reader is awake anyway.
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"\0")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in (self._fd, self._wake_read, self._wake_write):
                os.close(fd)
