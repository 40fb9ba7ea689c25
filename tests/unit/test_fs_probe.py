"""What the state folder's file system gives, found by trying it: on a local file
system everything works, the scratch folder goes away, and leftovers of a probe
that died are removed once stale (the shared file systems: test_sharedfs.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from niftidrop.fs_probe import (
    PROBE_PREFIX,
    STALE_PROBE_SECONDS,
    Capability,
    fs_time,
    make_folder,
    missing,
    probe,
)


class TestProbe:
    def test_a_local_file_system_gives_everything(self, tmp_path: Path) -> None:
        """Every capability works on the test machine's own file system."""
        capabilities = probe(tmp_path)
        assert [item.name for item in capabilities] == [
            "rename_replaces",
            "exclusive_create",
            "hard_links",
            "link_counts",
            "folder_fsync",
        ]
        assert all(item.works for item in capabilities), capabilities
        assert missing(capabilities) == []

    def test_leaves_nothing(self, tmp_path: Path) -> None:
        """The scratch folder and the clock file are removed."""
        probe(tmp_path)
        assert list(tmp_path.iterdir()) == []

    def test_a_missing_state_folder_is_an_error(self, tmp_path: Path) -> None:
        """A folder that does not exist raises the OSError that says so."""
        with pytest.raises(FileNotFoundError):
            probe(tmp_path / "nothere")

    def test_stale_leftovers_go_and_fresh_ones_stay(self, tmp_path: Path) -> None:
        """A probe folder older than STALE_PROBE_SECONDS is removed; a younger one, which
        another instance may be using, is kept."""
        stale, fresh = tmp_path / f"{PROBE_PREFIX}dead", tmp_path / f"{PROBE_PREFIX}busy"
        for folder in (stale, fresh):
            folder.mkdir()
            (folder / "source").write_bytes(b"x")
        old = time.time() - STALE_PROBE_SECONDS - 60
        os.utime(stale, (old, old))
        probe(tmp_path)
        assert sorted(path.name for path in tmp_path.iterdir()) == [fresh.name]


class TestMissing:
    def test_names_needed_capabilities_only(self, tmp_path: Path) -> None:
        """A needed capability that fails is named with its detail; one that is not
        needed (hard links: niftidrop copies) is not a problem."""
        capabilities = [
            Capability("rename_replaces", False, True, "refused"),
            Capability("hard_links", False, False, "copied instead"),
        ]
        assert missing(capabilities) == ["rename_replaces: refused"]


class TestClock:
    def test_reads_the_file_systems_time(self, tmp_path: Path) -> None:
        """On a local file system its clock is this host's; no file is left."""
        before = time.time()
        now = fs_time(tmp_path)
        assert before - 1 <= now <= time.time() + 1
        assert list(tmp_path.iterdir()) == []

    def test_make_folder_makes_or_finds_it_and_says_what_is_in_the_way(
        self, tmp_path: Path
    ) -> None:
        """Made with its parents, found when it exists; a file in its place, or a
        missing parent without `parents`, is the OS error (only ESTALE is tried
        again: the racing clients of test_sharedfs.py)."""
        folder = tmp_path / "a" / "b"
        make_folder(folder, parents=True)
        make_folder(folder)
        assert folder.is_dir()
        (tmp_path / "file").write_text("")
        with pytest.raises(FileExistsError):
            make_folder(tmp_path / "file")
        with pytest.raises(FileNotFoundError):
            make_folder(tmp_path / "missing" / "c")
