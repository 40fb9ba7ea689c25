"""Atomic, durable, deterministic output files."""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from niftidrop import writer
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.names import is_temp_name
from niftidrop.steps import WRITE_PHASES, hooked
from niftidrop.writer import (
    check_free,
    commit,
    link_exclusive,
    link_unique,
    write_file,
    write_json_atomic,
    write_temp,
)

PAYLOAD = [bytes(range(256)) * 4096, b"tail" * 1000]


class TestAtomicWrite:
    def test_write_file_is_gzip_readable_by_gzip_module_and_tool(self, tmp_path: Path) -> None:
        """The output is a standard gzip stream: Python's gzip and `gzip -t` accept it."""
        final = write_file(tmp_path / "a.nii.gz", PAYLOAD, compress=True, threads=2)
        assert gzip.decompress(final.read_bytes()) == b"".join(PAYLOAD)
        subprocess.run(["gzip", "-t", str(final)], check=True)

    def test_uncompressed(self, tmp_path: Path) -> None:
        """compress=False writes the bytes as they are."""
        final = write_file(tmp_path / "a.nii", PAYLOAD, compress=False)
        assert final.read_bytes() == b"".join(PAYLOAD)

    def test_same_bytes_whatever_the_time_name_or_threads(self, tmp_path: Path) -> None:
        """The gzip header has no name or mtime, so rewriting gives identical bytes."""
        one = write_file(tmp_path / "one.nii.gz", PAYLOAD, compress=True, threads=1)
        os.utime(tmp_path, (0, 0))
        two = write_file(tmp_path / "two.nii.gz", PAYLOAD, compress=True, threads=3)
        assert one.read_bytes() == two.read_bytes()
        assert one.read_bytes()[4:8] == b"\0\0\0\0"  # mtime field

    def test_a_function_that_writes_its_content_is_compressed_too(self, tmp_path: Path) -> None:
        """Content written through a file object (np.save) is copied into the gzip stream."""
        import io

        import numpy as np

        array = np.arange(2_000_000, dtype=np.int32).reshape(200, 100, 100)
        final = write_file(
            tmp_path / "a.npy.gz", lambda file: np.save(file, array), compress=True, threads=3
        )
        expected = io.BytesIO()
        np.save(expected, array)
        assert gzip.decompress(final.read_bytes()) == expected.getvalue()

    def test_same_bytes_on_the_calling_thread_or_a_pool(self, tmp_path: Path) -> None:
        """A small output (compressed on the calling thread) has the bytes a pool gives."""
        size = sum(len(chunk) for chunk in PAYLOAD)
        alone = write_file(tmp_path / "one.nii.gz", PAYLOAD, compress=True, threads=4, size=size)
        pooled = write_file(tmp_path / "two.nii.gz", PAYLOAD, compress=True, threads=4)
        assert alone.read_bytes() == pooled.read_bytes()

    def test_temporary_file_is_hidden_in_target_folder(self, tmp_path: Path) -> None:
        """While written, the data lives under `.<name>.<random>.tmp` next to the target."""
        seen: list[list[str]] = []

        def chunks() -> Iterator[bytes]:
            yield b"first"
            seen.append(sorted(path.name for path in tmp_path.iterdir()))
            yield b"second"

        write_file(tmp_path / "a.nii", chunks(), compress=False)
        (names,) = seen
        assert len(names) == 1
        assert names[0].startswith(".a.nii.")
        assert is_temp_name(names[0])
        assert [path.name for path in tmp_path.iterdir()] == ["a.nii"]

    def test_failure_mid_write_leaves_nothing(self, tmp_path: Path) -> None:
        """An exception while writing removes the temp file; the final name never appears."""

        def chunks() -> Iterator[bytes]:
            yield b"x" * 3_000_000
            raise ConversionError(ErrorCode.DTYPE_OVERFLOW, "late overflow")

        for compress in (True, False):
            with pytest.raises(ConversionError):
                write_file(tmp_path / "a.nii.gz", chunks(), compress=compress, threads=2)
            assert list(tmp_path.iterdir()) == []

    def test_failure_keeps_the_previous_output(self, tmp_path: Path) -> None:
        """A failed rewrite leaves the old file under the final name untouched."""
        final = write_file(tmp_path / "a.nii", [b"old"], compress=False)

        def chunks() -> Iterator[bytes]:
            yield b"new"
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space"):
            write_file(final, chunks(), compress=False)
        assert final.read_bytes() == b"old"
        assert [path.name for path in tmp_path.iterdir()] == ["a.nii"]

    def test_data_and_folder_are_fsynced(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """fsync=True syncs the file before the rename and the folder after it."""
        synced: list[bool] = []
        real_fsync = os.fsync

        def spy(descriptor: int) -> None:
            synced.append(stat.S_ISDIR(os.fstat(descriptor).st_mode))
            real_fsync(descriptor)

        monkeypatch.setattr(os, "fsync", spy)
        write_file(tmp_path / "a.nii", [b"x"], compress=False, fsync=True)
        assert synced == [False, True]
        synced.clear()
        write_file(tmp_path / "b.nii", [b"x"], compress=False, fsync=False)
        assert synced == []


class TestDurability:
    def test_new_folders_are_fsynced_in_their_parent(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Each folder write_file creates is made durable in its parent (a power cut
        must not lose the folder, and the output in it)."""
        synced: list[int] = []
        real_fsync = os.fsync

        def spy(descriptor: int) -> None:
            info = os.fstat(descriptor)
            if stat.S_ISDIR(info.st_mode):
                synced.append(info.st_ino)
            real_fsync(descriptor)

        monkeypatch.setattr(os, "fsync", spy)
        write_file(tmp_path / "a" / "b" / "c.nii", [b"x"], compress=False, fsync=True)
        for folder in (tmp_path, tmp_path / "a", tmp_path / "a" / "b"):
            assert folder.stat().st_ino in synced, folder


class TestAtomicJson:
    @pytest.mark.parametrize("phase", WRITE_PHASES)
    def test_a_failure_at_any_phase_leaves_no_temporary(self, tmp_path: Path, phase: str) -> None:
        """A full disk while writing a record keeps the old record and leaves no .tmp."""
        path = tmp_path / "record.json"
        write_json_atomic(path, {"n": 1}, durable=True, kind="error_record")

        def full(name: str) -> None:
            if name == f"error_record_{phase}":
                raise OSError(28, "No space left on device")

        with hooked(full), pytest.raises(OSError, match="No space"):
            write_json_atomic(path, {"n": 2}, durable=True, kind="error_record")
        assert json.loads(path.read_text()) == {"n": 1}
        assert [entry.name for entry in tmp_path.iterdir()] == ["record.json"]


class TestConflicts:
    def test_overwrite_replaces(self, tmp_path: Path) -> None:
        """overwrite replaces an existing file atomically."""
        write_file(tmp_path / "a.nii", [b"old"], compress=False)
        final = write_file(tmp_path / "a.nii", [b"new"], compress=False, on_conflict="overwrite")
        assert final.read_bytes() == b"new"

    def test_rename_finds_a_free_name(self, tmp_path: Path) -> None:
        """rename adds -1, -2, ... before the extension and never overwrites."""
        for content in (b"0", b"1", b"2"):
            write_file(tmp_path / "a.nii.gz", [content], compress=False, on_conflict="rename")
        assert (tmp_path / "a.nii.gz").read_bytes() == b"0"
        assert (tmp_path / "a-1.nii.gz").read_bytes() == b"1"
        assert (tmp_path / "a-2.nii.gz").read_bytes() == b"2"
        assert not [path for path in tmp_path.iterdir() if is_temp_name(path.name)]

    def test_fail_raises_output_conflict_and_cleans_up(self, tmp_path: Path) -> None:
        """fail raises OUTPUT_CONFLICT, keeps the old file and removes the temp file."""
        write_file(tmp_path / "a.nii", [b"old"], compress=False)
        with pytest.raises(ConversionError) as caught:
            write_file(tmp_path / "a.nii", [b"new"], compress=False, on_conflict="fail")
        assert caught.value.code is ErrorCode.OUTPUT_CONFLICT
        assert "a.nii" in str(caught.value)
        assert [path.name for path in tmp_path.iterdir()] == ["a.nii"]
        assert (tmp_path / "a.nii").read_bytes() == b"old"

    def test_without_hard_links_rename_still_never_overwrites(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """On file systems without links, rename/fail check before renaming."""

        def no_links(source: object, target: object, **options: object) -> None:
            raise OSError(1, "Operation not permitted")

        monkeypatch.setattr(writer.os, "link", no_links)
        write_file(tmp_path / "a.nii", [b"0"], compress=False)
        placed = write_file(tmp_path / "a.nii", [b"1"], compress=False, on_conflict="rename")
        assert placed.name == "a-1.nii"
        assert (tmp_path / "a.nii").read_bytes() == b"0"

    def test_commit_of_a_written_temp(self, tmp_path: Path) -> None:
        """write_temp + commit is write_file in two steps (several outputs, one decision)."""
        temp = write_temp(tmp_path / "a.nii", [b"x"], compress=False)
        assert temp.path.exists()
        assert temp.size == 1
        assert commit(temp, tmp_path / "a.nii", on_conflict="fail") == tmp_path / "a.nii"
        assert not temp.path.exists()


class TestLinks:
    def test_link_exclusive_never_replaces(self, tmp_path: Path) -> None:
        """A taken name is refused and kept; a free one gets the same inode."""
        (tmp_path / "a").write_bytes(b"a")
        (tmp_path / "b").write_bytes(b"b")
        assert not link_exclusive(tmp_path / "a", tmp_path / "b")
        assert (tmp_path / "b").read_bytes() == b"b"
        assert link_exclusive(tmp_path / "a", tmp_path / "c")
        assert (tmp_path / "c").stat().st_ino == (tmp_path / "a").stat().st_ino

    def test_link_unique_suffixes_a_taken_name(self, tmp_path: Path) -> None:
        """A name taken in the folder gets -1 before its extension."""
        source = tmp_path / "a.npy"
        source.write_bytes(b"new")
        folder = tmp_path / "inbox"
        folder.mkdir()
        (folder / "a.npy").write_bytes(b"old")
        assert link_unique(source, folder, fsync=False) == folder / "a-1.npy"
        assert (folder / "a-1.npy").stat().st_ino == source.stat().st_ino

    def test_link_unique_copies_where_links_are_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Where the source cannot be linked (another file system) a copy is linked."""
        source = tmp_path / "a.npy"
        source.write_bytes(b"data")
        real_link = os.link

        def cross_device(src: Path, dst: Path, **kwargs: bool) -> None:
            if Path(src) == source:
                raise OSError(18, "Invalid cross-device link")
            real_link(src, dst, **kwargs)

        monkeypatch.setattr(os, "link", cross_device)
        placed = link_unique(source, tmp_path / "other", fsync=False)
        assert placed.read_bytes() == b"data"
        assert placed.stat().st_ino != source.stat().st_ino
        assert [path.name for path in placed.parent.iterdir()] == ["a.npy"]

    def test_check_free_names_the_input_and_the_output(self, tmp_path: Path) -> None:
        """on_conflict = fail: a taken output name is OUTPUT_CONFLICT naming both."""
        taken = tmp_path / "a.nii.gz"
        check_free([taken], "a.npy")
        taken.write_bytes(b"")
        with pytest.raises(ConversionError) as caught:
            check_free([taken], "a.npy")
        assert caught.value.code is ErrorCode.OUTPUT_CONFLICT
        assert caught.value.message.startswith(f"a.npy: expected no file at output {taken}")
