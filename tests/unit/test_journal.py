"""The commit journal: identities recorded before naming, and finding them again."""

from __future__ import annotations

from pathlib import Path

import pytest

from niftidrop.journal import find_own, identity_of, read_journal, write_journal
from niftidrop.writer import write_temp


class TestJournal:
    def test_what_is_written_is_read_back(self, tmp_path: Path) -> None:
        """A journal written atomically reads back as the same names and identities."""
        journal = tmp_path / "journal.json"
        recorded = {"a.nii.gz": [1, 2, 3], "a.json": [1, 4, 5]}
        write_journal(journal, recorded, durable=False, owner="")
        assert read_journal(journal) == recorded
        assert [path.name for path in tmp_path.iterdir()] == ["journal.json"]

    @pytest.mark.parametrize("content", [None, "", "not json", "[1, 2]", '{"a": 1, "b": [1]}'])
    def test_a_missing_or_damaged_journal_records_nothing_usable(
        self, tmp_path: Path, content: str | None
    ) -> None:
        """No journal, one that does not parse, or entries that are no lists are ignored."""
        journal = tmp_path / "journal.json"
        if content is not None:
            journal.write_text(content)
        expected = {"b": [1]} if content and content.startswith("{") else {}
        assert read_journal(journal) == expected
        assert read_journal(None) == {}


class TestFindOwn:
    def test_the_file_is_found_under_whatever_name_it_got(self, tmp_path: Path) -> None:
        """The identity of a temporary finds the file once renamed, under another name too."""
        final = tmp_path / "a.nii.gz"
        temp = write_temp(final, [b"voxels"], compress=False, fsync=False)
        identity = identity_of(temp)
        assert identity == [*temp.inode, len(b"voxels")]
        given = tmp_path / "a-1.nii.gz"
        temp.path.rename(given)
        assert find_own(final, identity) == given

    def test_temporaries_and_other_files_are_not_found(self, tmp_path: Path) -> None:
        """A file still under its temporary name, or another file, is not this run's output."""
        final = tmp_path / "a.nii.gz"
        temp = write_temp(final, [b"voxels"], compress=False, fsync=False)
        assert find_own(final, identity_of(temp)) is None
        final.write_bytes(b"voxels")
        assert find_own(final, identity_of(temp)) is None

    def test_no_identity_or_no_folder_finds_nothing(self, tmp_path: Path) -> None:
        """A missing or malformed identity, or a missing folder, gives None."""
        final = tmp_path / "a.nii.gz"
        final.write_bytes(b"x")
        info = final.stat()
        assert find_own(final, [info.st_dev, info.st_ino, info.st_size]) == final
        assert find_own(final, None) is None
        assert find_own(final, [info.st_dev, info.st_ino]) is None
        assert find_own(tmp_path / "gone" / "a.nii.gz", [1, 2, 3]) is None
