"""Tests of readiness: when a sighted candidate is ready, truncated or ignored (README:
File protocol)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from niftidrop.completeness import Readiness, readiness
from niftidrop.readiness import ReadinessTracker


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Scene:
    """A readiness tracker on fake clocks, and files whose mtime is "now"."""

    def __init__(self, folder: Path, *, settle: float = 1.0, timeout: float = 10.0) -> None:
        self.folder = folder
        self.monotonic = FakeClock()
        self.wall = FakeClock(time.time())
        self.tracker = ReadinessTracker(
            settle_seconds=settle,
            incomplete_timeout=timeout,
            clock=self.monotonic,
            wall_clock=self.wall,
        )

    def file(self, name: str, content: bytes | np.ndarray[Any, Any]) -> Path:
        path = self.folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            with path.open("wb") as handle:
                np.save(handle, content, allow_pickle=content.dtype.hasobject)
        self.touch(path)
        return path

    def touch(self, path: Path) -> None:
        os.utime(path, (self.wall.now, self.wall.now))

    def later(self, seconds: float) -> None:
        self.monotonic.now += seconds
        self.wall.now += seconds

    def ready(self) -> list[Path]:
        return [path for path, _ in self.tracker.poll().ready]


def npy_bytes(array: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class TestReadiness:
    def test_finished_and_complete_is_ready_at_once(self, tmp_path: Path) -> None:
        """A complete file whose last event was close/moved-in needs no quiet time."""
        scene = Scene(tmp_path)
        path = scene.file("a.npy", np.zeros(3))
        scene.tracker.note(path, finished=True)
        assert scene.ready() == [path]
        assert len(scene.tracker) == 0

    def test_complete_but_not_finished_waits_for_quiet(self, tmp_path: Path) -> None:
        """Without a finishing event, a complete file waits settle_seconds unchanged."""
        scene = Scene(tmp_path)
        path = scene.file("a.npy", np.zeros(3))
        scene.tracker.note(path, finished=False)
        assert scene.tracker.poll().waiting == [path]
        scene.later(0.5)
        assert scene.tracker.poll().waiting == [path]
        scene.later(0.6)
        assert scene.ready() == [path]

    def test_old_file_is_ready_at_once(self, tmp_path: Path) -> None:
        """A backlog file untouched for longer than settle_seconds is ready immediately."""
        scene = Scene(tmp_path)
        path = scene.file("a.npy", np.zeros(3))
        os.utime(path, (scene.wall.now - 60, scene.wall.now - 60))
        scene.tracker.note(path, finished=False)
        assert scene.ready() == [path]

    def test_incomplete_is_never_ready_even_when_finished(self, tmp_path: Path) -> None:
        """A closed but structurally incomplete file is not read."""
        scene = Scene(tmp_path)
        path = scene.file("a.npy", npy_bytes(np.zeros(1000))[:-100])
        scene.tracker.note(path, finished=True)
        scene.later(5)
        assert scene.tracker.poll().waiting == [path]

    def test_incomplete_and_unchanged_becomes_truncated(self, tmp_path: Path) -> None:
        """Incomplete and unchanged for incomplete_timeout: truncated."""
        scene = Scene(tmp_path, timeout=10.0)
        path = scene.file("a.npy", b"\x93NUMPY")
        scene.tracker.note(path, finished=False)
        assert scene.tracker.poll().waiting == [path]
        scene.later(11)
        assert scene.tracker.poll().truncated == [path]

    def test_a_file_that_is_no_array_is_handed_on_once_quiet(self, tmp_path: Path) -> None:
        """Bytes that no .npy starts with are not waited for: handed on after settling."""
        scene = Scene(tmp_path, timeout=600.0)
        path = scene.file("a.npy", b"this is a text file, not an array")
        scene.tracker.note(path, finished=True)
        assert scene.tracker.poll().waiting == [path]
        scene.later(1.1)
        assert scene.ready() == [path]

    def test_a_pickled_object_npy_is_handed_on_once_quiet(self, tmp_path: Path) -> None:
        """A .npy of pickled objects never adds up to its declared size: not waited for."""
        scene = Scene(tmp_path, timeout=600.0)
        path = scene.file("a.npy", np.array([{"a": 1}, None], dtype=object))
        scene.tracker.note(path, finished=True)
        scene.later(1.1)
        assert scene.ready() == [path]

    def test_a_partial_signature_keeps_waiting(self, tmp_path: Path) -> None:
        """A file holding only the start of a signature (or nothing) may still grow."""
        scene = Scene(tmp_path, timeout=600.0)
        for name, data in (("a.npy", b"\x93NUM"), ("b.npz", b""), ("c.npz", b"PK\x03")):
            scene.tracker.note(scene.file(name, data), finished=False)
        scene.later(5)
        assert len(scene.tracker.poll().waiting) == 3

    def test_growth_restarts_the_quiet_time(self, tmp_path: Path) -> None:
        """A file that keeps changing is not truncated nor read."""
        scene = Scene(tmp_path, timeout=10.0)
        path = scene.file("a.npy", b"\x93NUMPY")
        scene.tracker.note(path, finished=False)
        scene.tracker.poll()
        for _ in range(3):
            scene.later(6)
            with path.open("ab") as handle:
                handle.write(b"x")
            scene.touch(path)
            assert scene.tracker.poll().waiting == [path]

    def test_change_after_close_needs_quiet_again(self, tmp_path: Path) -> None:
        """A file rewritten after its close event is not trusted until quiet."""
        scene = Scene(tmp_path)
        path = scene.file("a.npy", b"\x93NUMPY")
        scene.tracker.note(path, finished=True)
        assert scene.tracker.poll().waiting == [path]
        scene.later(0.1)
        scene.file("a.npy", np.zeros(3))
        assert scene.tracker.poll().waiting == [path]

    def test_an_unreadable_file_is_handed_on_not_truncated(self, tmp_path: Path) -> None:
        """A file the service may not open is handed on once quiet (the conversion
        retries it as transient), never left to time out as truncated."""
        path = tmp_path / "a.npy"
        path.write_bytes(npy_bytes(np.zeros(3)))
        os.utime(path, (time.time() - 60, time.time() - 60))
        tracker = ReadinessTracker(
            settle_seconds=1, incomplete_timeout=10, check=lambda _: Readiness.UNREADABLE
        )
        tracker.note(path, finished=False)
        verdicts = tracker.poll()
        assert ([ready for ready, _ in verdicts.ready], verdicts.truncated) == ([path], [])

    def test_symlink_is_ready_without_being_opened(self, tmp_path: Path) -> None:
        """A symlink is handed on at once (to be refused), never opened."""
        opened: list[Path] = []
        link = tmp_path / "a.npy"
        link.symlink_to(tmp_path / "missing.npy")
        tracker = ReadinessTracker(
            settle_seconds=1,
            incomplete_timeout=10,
            check=lambda path: opened.append(path) or Readiness.COMPLETE,
        )
        tracker.note(link, finished=False)
        assert [ready for ready, _ in tracker.poll().ready] == [link]
        assert opened == []

    def test_vanished_file_is_forgotten(self, tmp_path: Path) -> None:
        """A file that disappears is dropped silently."""
        scene = Scene(tmp_path)
        scene.tracker.note(tmp_path / "gone.npy", finished=True)
        verdicts = scene.tracker.poll()
        assert (verdicts.ready, verdicts.truncated, verdicts.waiting) == ([], [], [])
        assert len(scene.tracker) == 0


def hand_written_npy(text: str, length: int | None = None) -> bytes:
    """A version 1.0 .npy header with exactly `text` as its dict (and `length` field)."""
    raw = text.encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw) if length is None else length) + raw


def npz_with_version(version: int) -> bytes:
    """A valid .npz whose central directory says it needs zip version `version` / 10."""
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros(4))
    raw = bytearray(buffer.getvalue())
    central = raw.rindex(b"PK\x01\x02")
    raw[central + 6] = version  # "version needed to extract", low byte
    return bytes(raw)


class TestHostileHeaders:
    @pytest.mark.parametrize(
        "content",
        [
            # The header of issue 9, item 1: an unclosed "{" (numpy: TokenError).
            hand_written_npy(
                "{'descr': '<u1', 'fortran_order': False, 'shape': (4, 4, 4" + " " * 9 + "\n"
            )
            + bytes(64),
            hand_written_npy("{'descr': (), 'fortran_order': False, 'shape': (5,)}\n") + bytes(5),
            hand_written_npy("{'descr': '<u1', 'fortran_order': False, 'shape': (5,), }\n", 10)
            + bytes(64),
            hand_written_npy("{'descr': '<u1', 'fortran_order': False, 'shape': (5,), }\n", 0),
            hand_written_npy("(" * 5000 + "\n"),
        ],
        ids=["unclosed-brace", "empty-descr", "short-length", "zero-length", "deep-nesting"],
    )
    def test_malformed_npy_headers_are_handed_on_not_raised(
        self, tmp_path: Path, content: bytes
    ) -> None:
        """A header numpy's parser chokes on is handed on once quiet, never an exception."""
        scene = Scene(tmp_path, timeout=600.0)
        path = scene.file("a.npy", content)
        scene.tracker.note(path, finished=True)
        assert scene.tracker.poll().waiting == [path]
        scene.later(1.1)
        assert scene.ready() == [path]

    def test_unknown_zip_version_is_handed_on_not_raised(self, tmp_path: Path) -> None:
        """A .npz needing zip version 10.3 (zipfile: NotImplementedError) fails as corrupt."""
        scene = Scene(tmp_path, timeout=600.0)
        path = scene.file("a.npz", npz_with_version(103))
        scene.tracker.note(path, finished=True)
        scene.later(1.1)
        assert scene.ready() == [path]


class TestReadinessCost:
    def test_an_unchanged_file_is_not_checked_again(self, tmp_path: Path) -> None:
        """The check runs at most twice while a file's inode, size and times stay the same."""
        checks: list[Path] = []

        def check(path: Path) -> Readiness:
            checks.append(path)
            return readiness(path)

        scene = Scene(tmp_path, timeout=600.0)
        scene.tracker = ReadinessTracker(
            settle_seconds=1.0,
            incomplete_timeout=600.0,
            check=check,
            clock=scene.monotonic,
            wall_clock=scene.wall,
        )
        path = scene.file("a.npy", npy_bytes(np.zeros(1000))[:-100])
        scene.tracker.note(path, finished=False)
        for _ in range(20):
            scene.later(1)
            assert scene.tracker.poll().waiting == [path]
        assert len(checks) == 2
        with path.open("ab") as handle:
            handle.write(b"x" * 100)
        scene.touch(path)
        scene.later(1)
        assert scene.ready() == [path]
        assert len(checks) == 3

    def test_a_verdict_is_kept_only_once_past_a_timestamp_tick(self, tmp_path: Path) -> None:
        """Polls in the same instant as the first sighting do not keep their verdict (a
        write in that timestamp tick would not change the file's identity)."""
        checks: list[Path] = []
        clock = FakeClock()
        tracker = ReadinessTracker(
            settle_seconds=1.0,
            incomplete_timeout=600.0,
            check=lambda path: checks.append(path) or Readiness.INCOMPLETE,
            clock=clock,
        )
        path = tmp_path / "a.npy"
        path.write_bytes(b"\x93NUMPY")
        tracker.note(path, finished=False)
        for _ in range(3):
            tracker.poll()
        assert len(checks) == 3
        clock.now += 0.1
        for _ in range(3):
            tracker.poll()
        assert len(checks) == 4


class TestSpecialFiles:
    @pytest.mark.parametrize("kind", ["fifo", "socket", "folder"])
    def test_special_files_are_ignored_once(self, tmp_path: Path, kind: str) -> None:
        """A FIFO, socket or folder named like an input is reported once, never ready."""
        path = tmp_path / "x.npy"
        with contextlib.ExitStack() as stack:
            if kind == "fifo":
                os.mkfifo(path)
            elif kind == "socket":
                server = stack.enter_context(socket.socket(socket.AF_UNIX))
                server.bind(str(path))
            else:
                path.mkdir()
            scene = Scene(tmp_path)
            scene.tracker.note(path, finished=True)
            verdicts = scene.tracker.poll()
            expected = {"fifo": "named pipe", "socket": "socket", "folder": "folder"}[kind]
            assert verdicts.ignored == [(path, f"not a regular file but a {expected}")]
            assert (verdicts.ready, verdicts.waiting, len(scene.tracker)) == ([], [], 0)
            scene.tracker.note(path, finished=False)  # a rescan finds it again
            assert scene.tracker.poll().ignored == []

    def test_a_new_file_under_an_ignored_name_is_seen(self, tmp_path: Path) -> None:
        """After an ignored FIFO is replaced, by a file or another FIFO, it is news again."""
        path = tmp_path / "x.npy"
        os.mkfifo(path)
        scene = Scene(tmp_path)
        scene.tracker.note(path, finished=True)
        assert len(scene.tracker.poll().ignored) == 1
        path.unlink()
        scene.file("x.npy", np.zeros(3))
        scene.tracker.note(path, finished=True)
        assert scene.ready() == [path]
        path.unlink()
        os.mkfifo(path)
        scene.tracker.note(path, finished=True)
        assert len(scene.tracker.poll().ignored) == 1
