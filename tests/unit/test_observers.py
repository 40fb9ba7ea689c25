"""Tests of the observer choice: polling on network and FUSE file systems (SPEC §1.10)."""

from __future__ import annotations

from pathlib import Path

import pytest
from watchdog.observers.polling import PollingObserver

from niftidrop.observers import file_system_type, is_within, make_observer, needs_polling


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

    def test_forced_observer_kinds(self, tmp_path: Path) -> None:
        """`polling` forces a polling observer and `inotify` the native one."""
        assert isinstance(make_observer("polling", 0.5, [tmp_path]), PollingObserver)
        assert not isinstance(make_observer("inotify", 0.5, [tmp_path]), PollingObserver)
