"""Tests of candidate filtering, inbox scans, the inbox watcher and readiness (SPEC §1.1)."""

from __future__ import annotations

import contextlib
import io
import os
import queue
import socket
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from niftidrop import inotify
from niftidrop.completeness import Readiness, readiness
from niftidrop.watcher import (
    CandidateFilter,
    InboxWatcher,
    ReadinessTracker,
    Seen,
    Sighting,
    choose_observer,
    is_candidate,
    scan_inbox,
)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class TestCandidateFilter:
    @pytest.mark.parametrize("name", ["a.npy", "A.NPZ", "case_1.Npy", "x.y.npz"])
    def test_accepts_inputs_in_any_case(self, name: str) -> None:
        """*.npy and *.npz are candidates whatever the case of the extension."""
        assert is_candidate(name)

    @pytest.mark.parametrize(
        "name",
        [
            ".a.npy",
            "a.npy.tmp",
            "a.npy.part",
            "a.npz.partial",
            "a.npy.crdownload",
            "a.npy~",
            "a.nii.gz",
            "a.txt",
            "npy",
        ],
    )
    def test_refuses_hidden_temporary_and_other_names(self, name: str) -> None:
        """Hidden, temporary, partial-download and non-array names are never touched."""
        assert not is_candidate(name)

    def test_repr_shows_the_rules(self) -> None:
        """The filter's repr says what it accepts."""
        text = repr(CandidateFilter())
        assert ".npz" in text
        assert ".crdownload" in text


@contextlib.contextmanager
def chain(top: Path, name: str, depth: int, files: dict[int, str]) -> Iterator[list[Path]]:
    """`depth` folders named `name`, one in the other, under `top` (made through
    descriptors: their paths may exceed the system's limit), with a file named
    files[level] at the levels given; yields the folders' paths; removed at the end."""
    descriptors = [os.open(top, os.O_RDONLY | os.O_DIRECTORY)]
    folders = [top]
    try:
        for level in range(depth + 1):
            if level in files:
                os.close(os.open(files[level], os.O_CREAT | os.O_WRONLY, dir_fd=descriptors[-1]))
            if level < depth:
                os.mkdir(name, dir_fd=descriptors[-1])
                descriptors.append(os.open(name, os.O_RDONLY, dir_fd=descriptors[-1]))
                folders.append(folders[-1] / name)
        yield folders
    finally:
        for level in range(len(descriptors) - 1, -1, -1):
            if level in files:
                os.unlink(files[level], dir_fd=descriptors[level])
            if level < len(descriptors) - 1:
                os.rmdir(name, dir_fd=descriptors[level])
            os.close(descriptors[level])


class TestScan:
    def test_scan_skips_hidden_folders_and_non_candidates(self, tmp_path: Path) -> None:
        """The state folder (hidden) and non-candidates are not reported; subfolders are."""
        for relative in ["a.npy", "sub/b.npz", ".niftidrop/claimed/x/c.npy", "d.npy.tmp"]:
            path = tmp_path / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        found = sorted(str(p.relative_to(tmp_path)) for p in scan_inbox(tmp_path, recursive=True))
        assert found == ["a.npy", "sub/b.npz"]

    def test_not_recursive(self, tmp_path: Path) -> None:
        """recursive = false ignores subfolders."""
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "b.npy").write_bytes(b"")
        (tmp_path / "a.npy").write_bytes(b"")
        assert list(scan_inbox(tmp_path, recursive=False)) == [tmp_path / "a.npy"]

    def test_symlinked_folders_are_not_entered(self, tmp_path: Path) -> None:
        """A symlink to a folder is not followed (a path never escapes the inbox)."""
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret.npy").write_bytes(b"")
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        (inbox / "escape").symlink_to(outside)
        assert list(scan_inbox(inbox, recursive=True)) == []

    def test_a_tree_deeper_than_the_path_limit_is_scanned_without_error(
        self, tmp_path: Path
    ) -> None:
        """Files within the path limit are found; the first folder beyond it is reported
        as unreachable (not entered), and the scan never raises."""
        path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
        unreachable: list[Path] = []
        files = {0: "top.npy", 2: "near.npy", 30: "far.npy"}
        with chain(tmp_path, "d" * 200, 30, files) as folders:
            found = list(scan_inbox(tmp_path, recursive=True, unreachable=unreachable.append))
            assert found == [tmp_path / "top.npy", folders[2] / "near.npy"]
            (beyond,) = unreachable
            assert len(os.fsencode(beyond)) >= path_max
            assert len(os.fsencode(beyond.parent)) < path_max

    def test_a_tree_deeper_than_the_recursion_limit_is_scanned(self, tmp_path: Path) -> None:
        """Depth is no problem: the scan is a loop, not a recursion."""
        with chain(tmp_path, "d", 1100, {1100: "deep.npy"}) as folders:
            assert list(scan_inbox(tmp_path, recursive=True)) == [folders[-1] / "deep.npy"]

    def test_a_folder_swapped_for_a_symlink_is_never_listed(
        self, tmp_path: Path, flip_names: Callable[[Path, Path], Callable[[], None]]
    ) -> None:
        """While a subfolder is exchanged with a symlink to an outside folder again and
        again, scans list only the inbox's own files."""
        inbox, outside = tmp_path / "inbox", tmp_path / "outside"
        (inbox / "sub").mkdir(parents=True)
        outside.mkdir()
        for number in range(50):
            (inbox / "sub" / f"inside{number}.npy").write_bytes(b"")
            (outside / f"outside{number}.npy").write_bytes(b"")
        link = tmp_path / "link"
        link.symlink_to(outside)
        flip_names(inbox / "sub", link)
        names: set[str] = set()
        deadline = time.monotonic() + 2  # long enough for the flipper to get a core
        while time.monotonic() < deadline:
            names.update(path.name for path in scan_inbox(inbox, recursive=True))
        assert names
        assert all(name.startswith("inside") for name in names)

    def test_observer_choice(self, tmp_path: Path) -> None:
        """Forced observers are kept; auto picks inotify on a local file system."""
        assert choose_observer("polling", tmp_path) == "polling"
        assert choose_observer("inotify", tmp_path) == "inotify"
        assert choose_observer("auto", tmp_path) in ("inotify", "polling")


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

    def test_a_huge_zip_directory_is_not_parsed(self, tmp_path: Path) -> None:
        """A zip directory past the check's cap costs no parse: only its bounds are read."""
        path = tmp_path / "many.npz"
        with zipfile.ZipFile(path, "w") as archive:
            for number in range(3000):
                archive.writestr(f"a{number}.npy", b"")
        started = time.perf_counter()
        for _ in range(50):
            assert readiness(path) is Readiness.COMPLETE
        assert time.perf_counter() - started < 0.5


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

    def test_a_fifo_swapped_in_after_the_lstat_does_not_block(self, tmp_path: Path) -> None:
        """The check opens without blocking: a FIFO with no writer is "changed", at once."""
        path = tmp_path / "x.npy"
        os.mkfifo(path)
        started = time.monotonic()
        assert readiness(path) is Readiness.CHANGED
        assert time.monotonic() - started < 1


class TestInboxWatcher:
    @pytest.fixture
    def watched(self, tmp_path: Path) -> Iterator[tuple[Path, queue.SimpleQueue[Sighting]]]:
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        watcher = InboxWatcher(inbox, sightings, observer="inotify")
        watcher.start()
        yield inbox, sightings
        watcher.stop()

    def collect(
        self, sightings: queue.SimpleQueue[Sighting], until: Callable[[list[Sighting]], bool]
    ) -> list[Sighting]:
        seen: list[Sighting] = []
        deadline = time.monotonic() + 10
        while not until(seen):
            assert time.monotonic() < deadline, f"only saw {seen}"
            with contextlib.suppress(queue.Empty):
                seen.append(sightings.get(timeout=0.1))
        return seen

    def test_rename_into_the_inbox_is_finished(
        self, watched: tuple[Path, queue.SimpleQueue[Sighting]], tmp_path: Path
    ) -> None:
        """A file moved in is reported finished."""
        inbox, sightings = watched
        np.save(tmp_path / "a.npy", np.zeros(3))
        (tmp_path / "a.npy").rename(inbox / "a.npy")
        seen = self.collect(sightings, bool)
        assert seen == [(inbox / "a.npy", Seen.FINISHED)]

    def test_write_in_place_is_written_then_finished(
        self, watched: tuple[Path, queue.SimpleQueue[Sighting]]
    ) -> None:
        """np.save in the inbox gives a created sighting, then a finished one at close."""
        inbox, sightings = watched
        np.save(inbox / "a.npy", np.zeros(3))
        seen = self.collect(sightings, lambda s: (inbox / "a.npy", Seen.FINISHED) in s)
        assert seen[0] == (inbox / "a.npy", Seen.WRITTEN)

    def test_new_subfolder_is_reported_and_watched(
        self, watched: tuple[Path, queue.SimpleQueue[Sighting]]
    ) -> None:
        """A new subfolder is reported for a scan, and files inside it are seen."""
        inbox, sightings = watched
        (inbox / "site").mkdir()
        self.collect(sightings, lambda s: (inbox / "site", Seen.FOLDER) in s)
        np.save(inbox / "site" / "b.npy", np.zeros(3))
        self.collect(sightings, lambda s: (inbox / "site" / "b.npy", Seen.FINISHED) in s)

    def test_hidden_and_moved_out_files_are_not_reported(
        self, watched: tuple[Path, queue.SimpleQueue[Sighting]], tmp_path: Path
    ) -> None:
        """Hidden names and files leaving the inbox produce no sighting."""
        inbox, sightings = watched
        np.save(inbox / ".hidden.npy", np.zeros(3))
        (inbox / "a.npy.tmp").write_bytes(b"")
        (inbox / "a.npy.tmp").rename(tmp_path / "elsewhere")
        np.save(inbox / "last.npy", np.zeros(3))
        seen = self.collect(sightings, lambda s: (inbox / "last.npy", Seen.FINISHED) in s)
        assert {path.name for path, _ in seen} == {"last.npy"}

    def test_queue_overflow_asks_for_a_full_rescan(self, tmp_path: Path) -> None:
        """When the kernel drops events, the whole inbox is reported for a scan."""
        sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        watcher = InboxWatcher(tmp_path, sightings, observer="inotify")
        watcher._handle(inotify.RawEvent(-1, inotify.IN_Q_OVERFLOW, 0, b""))
        assert sightings.get_nowait() == (tmp_path, Seen.FOLDER)

    def test_polling_observer_reports_files(self, tmp_path: Path) -> None:
        """The polling observer (network file systems) reports new files as written."""
        sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        watcher = InboxWatcher(tmp_path, sightings, observer="polling", poll_interval=0.1)
        watcher.start()
        try:
            np.save(tmp_path / "a.npy", np.zeros(3))
            seen = self.collect(sightings, lambda s: (tmp_path / "a.npy", Seen.WRITTEN) in s)
            assert all(kind is not Seen.FINISHED for _, kind in seen)
        finally:
            watcher.stop()

    def test_polling_inbox_below_a_hidden_folder_reports_files(self, tmp_path: Path) -> None:
        """A hidden folder above the inbox (`~/.local/...`) hides nothing from polling;
        hidden names inside the inbox stay hidden."""
        inbox = tmp_path / ".local" / "inbox"
        (inbox / ".state").mkdir(parents=True)
        sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        watcher = InboxWatcher(inbox, sightings, observer="polling", poll_interval=0.1)
        watcher.start()
        try:
            np.save(inbox / ".state" / "claimed.npy", np.zeros(3))
            np.save(inbox / ".hidden.npy", np.zeros(3))
            np.save(inbox / "a.npy", np.zeros(3))
            seen = self.collect(sightings, lambda s: (inbox / "a.npy", Seen.WRITTEN) in s)
            assert {path.name for path, _ in seen} == {"a.npy"}
        finally:
            watcher.stop()
