"""Tests of reference keys, the key index and the folder scanner (README: Reference matching)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from niftidrop.reference_index import (
    MTIME_SLACK_NS,
    ReferenceIndex,
    ReferenceKeys,
    ReferenceScanner,
    pattern_key,
)


class TestKeys:
    def test_pattern_key(self) -> None:
        """The key group of the pattern is the key; no match or an empty group is no key."""
        pattern = re.compile(r"(?P<key>case\d*)")
        assert pattern_key(pattern, "x_case12_0000") == "case12"
        assert pattern_key(pattern, "scan12") is None
        assert pattern_key(re.compile(r"(?P<key>\d*)"), "abc") is None

    def test_reference_keys_apply_the_pattern(self) -> None:
        """ReferenceKeys strips the extension, then applies key_pattern if there is one."""
        assert ReferenceKeys(None)("case1_0000.nii.gz") == "case1_0000"
        with_pattern = ReferenceKeys(re.compile(r"^(?P<key>case\d+)"))
        assert with_pattern("case1_0000.nii.gz") == "case1"
        assert with_pattern("other.nii.gz") is None
        assert with_pattern("case1.txt") is None


class TestReferenceIndex:
    def test_built_from_entries(self) -> None:
        """Entries with one key are grouped; size counts paths, keys are sorted."""
        index = ReferenceIndex([("b", "/l/b.nii"), ("a", "/l/a.nii"), ("b", "/m/b.nii")])
        assert index.paths_by_key == {"a": ("/l/a.nii",), "b": ("/l/b.nii", "/m/b.nii")}
        assert index.sorted_keys == ["a", "b"]
        assert index.size == 3

    def test_add_and_discard_keep_keys_sorted(self) -> None:
        """add/discard update paths, size and the sorted keys, and repeat without effect."""
        index = ReferenceIndex([("m", "/l/m.nii")])
        index.add("c", "/l/c.nii")
        index.add("c", "/l/c.nii")
        index.add("z", "/l/z.nii")
        assert index.sorted_keys == ["c", "m", "z"]
        assert index.size == 3
        index.discard("m", "/l/m.nii")
        index.discard("m", "/l/m.nii")
        index.discard("c", "/other/c.nii")
        assert index.sorted_keys == ["c", "z"]
        assert index.size == 2

    def test_discard_one_of_a_shared_key(self) -> None:
        """Removing one file of an ambiguous key leaves the other."""
        index = ReferenceIndex([("x", "/a/x.nii"), ("x", "/b/x.nii")])
        index.discard("x", "/a/x.nii")
        assert index.paths_by_key == {"x": ("/b/x.nii",)}

    def test_keys_extending(self) -> None:
        """Keys extending a key by separator + more are found sorted, not token-inside ones."""
        index = ReferenceIndex(
            (key, f"/l/{key}.nii")
            for key in ["case1", "case1_0001", "case1-a", "case1_0000", "case10", "case1_", "case2"]
        )
        assert index.keys_extending("case1", "_-.") == ["case1-a", "case1_0000", "case1_0001"]
        assert index.keys_extending("case1", "_") == ["case1_0000", "case1_0001"]
        assert index.keys_extending("case3", "_-.") == []

    def test_entries_under(self) -> None:
        """entries_under finds the paths inside a folder tree, not in a longer-named folder."""
        index = ReferenceIndex(
            [("a", "/l/sub/a.nii"), ("c", "/l/sub/deep/c.nii"), ("b", "/l/subway/b.nii")]
        )
        assert sorted(index.entries_under("/l/sub")) == [
            ("a", "/l/sub/a.nii"),
            ("c", "/l/sub/deep/c.nii"),
        ]

    def test_keys_by_folder_follows_changes(self) -> None:
        """Each folder's references stay known through add and discard."""
        index = ReferenceIndex([("a", "/l/a.nii")])
        index.add("b", "/l/s/b.nii")
        assert index.keys_by_folder == {"/l": {"/l/a.nii": "a"}, "/l/s": {"/l/s/b.nii": "b"}}
        index.discard("b", "/l/s/b.nii")
        assert index.keys_by_folder == {"/l": {"/l/a.nii": "a"}}


class TestReferenceScanner:
    def test_finds_references_recursively(self, tmp_path: Path) -> None:
        """Every reference below the folder is found with its key; other files are not."""
        for name in ("a.nii.gz", "deep/er/b.NII", "notes.txt", ".hidden.nii", ".cache/c.nii"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).touch()
        found = ReferenceScanner(ReferenceKeys(None)).scan(str(tmp_path))
        assert sorted(found) == [
            ("a", str(tmp_path / "a.nii.gz")),
            ("b", str(tmp_path / "deep" / "er" / "b.NII")),
        ]

    def test_records_symlinked_folders_once(self, tmp_path: Path) -> None:
        """Symlinked folders are followed and recorded; a loop back is not followed again."""
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "x.nii").touch()
        root = tmp_path / "root"
        root.mkdir()
        (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
        (root / "link" / "back").symlink_to(root, target_is_directory=True)
        scanner = ReferenceScanner(ReferenceKeys(None))
        assert scanner.scan(str(root)) == [("x", str(root / "link" / "x.nii"))]
        assert scanner.linked == [str(root / "link")]

    def test_missing_folder_finds_nothing(self, tmp_path: Path) -> None:
        """A folder that does not exist is an empty scan, not an error."""
        assert ReferenceScanner(ReferenceKeys(None)).scan(str(tmp_path / "absent")) == []


def age(folder: Path, seconds: float) -> None:
    """Set `folder`'s mtime `seconds` into the past, as if it had not changed since."""
    past = time.time_ns() - int(seconds * 1e9)
    os.utime(folder, ns=(past, past))


class TestScannerSnapshots:
    def test_unchanged_folders_are_not_listed_again(self, tmp_path: Path) -> None:
        """A folder whose mtime is old and unchanged is reused, not listed."""
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "a.nii").touch()
        age(tmp_path / "sub", 3600)
        age(tmp_path, 3600)
        keys = ReferenceKeys(None)
        first = ReferenceScanner(keys)
        assert first.scan(str(tmp_path)) == [("a", str(tmp_path / "sub" / "a.nii"))]
        second = ReferenceScanner(keys, previous=first.snapshots)
        assert second.scan(str(tmp_path)) == []
        assert second.listed == set()
        assert second.snapshots == first.snapshots

    def test_changed_folder_is_listed_again(self, tmp_path: Path) -> None:
        """A file added to a folder changes its mtime, so that folder alone is listed."""
        (tmp_path / "sub").mkdir()
        age(tmp_path / "sub", 3600)
        age(tmp_path, 3600)
        keys = ReferenceKeys(None)
        first = ReferenceScanner(keys)
        first.scan(str(tmp_path))
        (tmp_path / "sub" / "new.nii").touch()
        second = ReferenceScanner(keys, previous=first.snapshots)
        assert second.scan(str(tmp_path)) == [("new", str(tmp_path / "sub" / "new.nii"))]
        assert second.listed == {str(tmp_path / "sub")}

    def test_recent_folders_are_always_listed(self, tmp_path: Path) -> None:
        """A folder changed shortly before its listing is listed again, mtime or not."""
        (tmp_path / "a.nii").touch()
        keys = ReferenceKeys(None)
        first = ReferenceScanner(keys)
        first.scan(str(tmp_path))
        snapshot = first.snapshots[str(tmp_path)]
        assert snapshot.listed_ns - snapshot.mtime_ns < MTIME_SLACK_NS
        second = ReferenceScanner(keys, previous=first.snapshots)
        assert second.scan(str(tmp_path)) == [("a", str(tmp_path / "a.nii"))]
