"""Tests of the observer choice (polling on network and FUSE file systems, README: File protocol)
and of keeping folder watches alive."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from niftidrop.observers import (
    FolderWatches,
    choose_observer,
    file_system_type,
    folder_identity,
    is_within,
    make_observer,
    needs_polling,
)


class TestIsWithin:
    def test_folder_and_below_only(self) -> None:
        """A path is within a folder when it is the folder or below it, not a longer name."""
        assert is_within("/a/b", "/a/b")
        assert is_within("/a/b/c", "/a/b")
        assert is_within("/a/b/c", "/")
        assert not is_within("/a/bc", "/a/b")


class TestObserverChoice:
    MOUNTS = (
        "22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
        "23 22 0:22 / /mnt/share rw shared:1 - nfs4 server:/export rw\n"
        "24 22 0:23 / /mnt/my\\040fuse rw - fuse.sshfs remote: rw\n"
        "25 23 0:24 / /mnt/share/local rw - tmpfs tmpfs rw\n"
        "26 22 0:25 / /mnt/share/local/cut rw -\n"
        "\n"
    )

    @pytest.fixture
    def mountinfo(self, tmp_path: Path) -> Path:
        path = tmp_path / "mountinfo"
        path.write_text(self.MOUNTS)
        return path

    def test_longest_mount_point_wins(self, mountinfo: Path) -> None:
        """The file system is the one of the innermost mount holding the path."""
        assert file_system_type("/mnt/share/x", mountinfo) == "nfs4"
        assert file_system_type("/mnt/share/local/x", mountinfo) == "tmpfs"
        assert file_system_type("/mnt/sharex", mountinfo) == "ext4"
        assert file_system_type("/mnt/my fuse/a", mountinfo) == "fuse.sshfs"
        assert file_system_type("/mnt/share/local/cut", mountinfo) == "tmpfs"  # cut line skipped

    def test_network_and_fuse_are_polled(self, mountinfo: Path) -> None:
        """nfs and fuse file systems need polling; local ones do not."""
        assert needs_polling("/mnt/share/x", mountinfo)
        assert needs_polling("/mnt/my fuse", mountinfo)
        assert not needs_polling("/mnt/share/local", mountinfo)
        assert not needs_polling("/home", mountinfo)

    def test_unknown_without_mountinfo(self, tmp_path: Path) -> None:
        """Without a readable mountinfo the type is unknown and inotify is kept."""
        assert file_system_type("/", tmp_path / "absent") is None
        assert not needs_polling("/", tmp_path / "absent")

    def test_observer_choice(self, tmp_path: Path) -> None:
        """Forced observers are kept; auto picks inotify on a local file system."""
        assert choose_observer("polling", tmp_path) == "polling"
        assert choose_observer("inotify", tmp_path) == "inotify"
        assert choose_observer("auto", tmp_path) in ("inotify", "polling")

    def test_forced_observer_kinds(self, tmp_path: Path) -> None:
        """`polling` forces a polling observer and `inotify` the native one."""
        assert isinstance(make_observer("polling", 0.5, [tmp_path]), PollingObserver)
        assert not isinstance(make_observer("inotify", 0.5, [tmp_path]), PollingObserver)


class TestFolderWatches:
    @pytest.fixture
    def watches(self) -> Iterator[FolderWatches]:
        observer = Observer()
        observer.start()
        yield FolderWatches(observer, lambda real, path: FileSystemEventHandler())
        observer.stop()
        observer.join()

    def test_identity_is_of_folders_only(self, tmp_path: Path) -> None:
        """A folder's identity is its device and inode; a file or nothing has none."""
        (tmp_path / "file").touch()
        assert folder_identity(tmp_path) == (tmp_path.stat().st_dev, tmp_path.stat().st_ino)
        assert folder_identity(tmp_path / "file") is None
        assert folder_identity(tmp_path / "missing") is None

    def test_a_missing_folder_is_lost_until_made(
        self, tmp_path: Path, watches: FolderWatches
    ) -> None:
        """Watching a folder that is not there yet lists it as lost; once it is made,
        `renew_lost` watches it."""
        folder = str(tmp_path / "later")
        assert not watches.watch(folder)
        assert folder in watches
        assert watches.renew_lost() == ([], True)
        (tmp_path / "later").mkdir()
        assert watches.renew_lost() == ([folder], False)
        assert watches.lost() == []

    def test_deleted_and_replaced_folders_are_lost(
        self, tmp_path: Path, watches: FolderWatches
    ) -> None:
        """A folder deleted, or renamed away and replaced, is reported lost."""
        deleted, replaced = tmp_path / "deleted", tmp_path / "replaced"
        for folder in (deleted, replaced):
            folder.mkdir()
            assert watches.watch(str(folder))
        assert watches.lost() == []
        shutil.rmtree(deleted)
        replaced.rename(tmp_path / "away")
        replaced.mkdir()
        deadline = time.monotonic() + 10
        while len(watches.lost()) < 2:  # the deletion is seen by the emitter's thread
            assert time.monotonic() < deadline, watches.lost()
            time.sleep(0.02)
        assert sorted(watches.lost()) == [str(deleted), str(replaced)]
        watches.forget(str(deleted))
        assert watches.renew_lost() == ([str(replaced)], False)
        assert repr(watches) == f"FolderWatches([{str(replaced)!r}])"
