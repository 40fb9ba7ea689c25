"""Tests of the inotify reader: events are handed over at once, unpaired."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from niftidrop import inotify


class TestInotify:
    def test_parse_events_reads_packed_records(self) -> None:
        """Records of a read() are split into (wd, mask, cookie, name) events."""
        first = struct.pack("iIII", 1, inotify.IN_CREATE, 0, 8) + b"a.npy\0\0\0"
        second = struct.pack("iIII", 1, inotify.IN_Q_OVERFLOW, 0, 0)
        events = inotify.parse_events(first + second)
        assert [(e.wd, e.mask, e.name) for e in events] == [
            (1, inotify.IN_CREATE, b"a.npy"),
            (1, inotify.IN_Q_OVERFLOW, b""),
        ]

    def test_inotify_reports_a_move_out_at_once(self, tmp_path: Path) -> None:
        """The raw reader hands over IN_MOVED_FROM without holding it for pairing."""
        watch = inotify.Inotify()
        try:
            watch.add_watch(os.fsencode(tmp_path), inotify.IN_MOVED_FROM | inotify.IN_MOVED_TO)
            (tmp_path / "a").write_bytes(b"")
            other = tmp_path.parent / f"{tmp_path.name}-out"
            (tmp_path / "a").rename(other)
            events = watch.read(timeout=5.0)
            assert [event.mask & inotify.IN_MOVED_FROM for event in events] == [
                inotify.IN_MOVED_FROM
            ]
            other.unlink()
        finally:
            watch.close()

    def test_wake_interrupts_a_blocked_read_once(self, tmp_path: Path) -> None:
        """wake() ends a blocked read; the next read blocks again (no busy loop)."""
        watch = inotify.Inotify()
        try:
            watch.add_watch(os.fsencode(tmp_path), inotify.IN_CREATE)
            watch.wake()
            assert watch.read(timeout=5.0) == []
            started = time.monotonic()
            assert watch.read(timeout=0.2) == []
            assert time.monotonic() - started >= 0.15
        finally:
            watch.close()
