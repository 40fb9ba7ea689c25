"""Tests of inbox scans: every candidate, never outside the inbox, whatever the tree
(README: File protocol)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from niftidrop.listing import scan_inbox


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
