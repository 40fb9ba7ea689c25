"""Whether inbox files are whole: complete, still growing, never, or changed."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np

from niftidrop.completeness import Readiness, is_complete, readiness
from niftidrop.errors import ErrorCode
from npy_inputs import npy_bytes, rejection


class TestIsComplete:
    def test_whole_npy_is_complete(self, tmp_path: Path) -> None:
        """A .npy whose header offset plus data bytes equals its size is complete."""
        path = tmp_path / "a.npy"
        np.save(path, np.zeros((3, 4, 5), np.float32))
        assert is_complete(path)

    def test_every_prefix_of_npy_is_incomplete(self, tmp_path: Path) -> None:
        """A .npy still being written (any shorter prefix) is not complete."""
        whole = npy_bytes(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
        path = tmp_path / "a.npy"
        for length in (0, 5, 60, 127, 128, len(whole) - 1):
            path.write_bytes(whole[:length])
            assert not is_complete(path), length

    def test_npy_with_trailing_bytes_is_not_complete(self, tmp_path: Path) -> None:
        """More bytes than the header declares is not a structurally whole .npy."""
        path = tmp_path / "a.npy"
        path.write_bytes(npy_bytes(np.zeros(4)) + b"x")
        assert not is_complete(path)

    def test_whole_npz_is_complete_and_prefixes_are_not(self, tmp_path: Path) -> None:
        """A .npz is complete only once its zip directory and every member are present."""
        path = tmp_path / "a.npz"
        np.savez_compressed(path, x=np.random.default_rng(0).random((20, 20)), y=np.ones(5))
        whole = path.read_bytes()
        assert is_complete(path)
        for length in (0, 10, len(whole) // 2, len(whole) - 1):
            path.write_bytes(whole[:length])
            assert not is_complete(path), length

    def test_npz_with_missing_member_bytes_is_incomplete(self, tmp_path: Path) -> None:
        """A zip directory that points past the members actually written is incomplete."""
        path = tmp_path / "a.npz"
        np.savez(path, x=np.arange(1000))
        whole = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as archive:
            start = archive.start_dir  # type: ignore[attr-defined]
        # Cut 100 bytes of member data out, keeping the directory at the end.
        path.write_bytes(bytes(whole[: start - 100] + whole[start:]))
        assert not is_complete(path)

    def test_other_files_are_never_complete(self, tmp_path: Path) -> None:
        """Missing files, other extensions and garbage give False, never an exception."""
        garbage = tmp_path / "g.npy"
        garbage.write_bytes(b"\x93NUMPY\x01\x00\xff\xff{'descr'")
        other = tmp_path / "a.txt"
        other.write_text("hello")
        assert not is_complete(tmp_path / "missing.npy")
        assert not is_complete(garbage)
        assert not is_complete(other)


class TestReadiness:
    def test_an_npz_missing_bytes_before_its_directory_is_never_whole(self, tmp_path: Path) -> None:
        """Found by fuzzing: bytes cut out before the directory make zipfile give a member
        a negative offset. The seek to it (EINVAL) is "never" for the check, not
        "unreadable", and CORRUPT for the conversion, not an OSError retried forever."""
        path = tmp_path / "cut.npz"
        np.savez_compressed(path, x=np.random.default_rng(0).random(100))
        raw = path.read_bytes()
        path.write_bytes(raw[:40] + raw[60:])
        assert readiness(path) is Readiness.NEVER
        assert rejection(path).code is ErrorCode.CORRUPT

    def test_verdicts(self, tmp_path: Path) -> None:
        """Whole, still growing, never whole: each file gets the verdict it deserves."""
        whole = npy_bytes(np.arange(60, dtype=np.int16))
        cases = {
            "whole.npy": (whole, Readiness.COMPLETE),
            "growing.npy": (whole[:-1], Readiness.INCOMPLETE),
            "magic.npy": (whole[:3], Readiness.INCOMPLETE),
            "empty.npy": (b"", Readiness.INCOMPLETE),
            "header.npy": (whole[:50], Readiness.INCOMPLETE),
            "trailing.npy": (whole + b"x", Readiness.NEVER),
            "text.npy": (b"hello, world", Readiness.NEVER),
            "version.npy": (b"\x93NUMPY\x09\x00" + whole[8:], Readiness.NEVER),
            "pickle.npy": (npy_bytes(np.array([None, 1], dtype=object)), Readiness.NEVER),
            "other.txt": (b"hello", Readiness.NEVER),
            "empty.npz": (b"", Readiness.INCOMPLETE),
            "text.npz": (b"hello" * 20, Readiness.INCOMPLETE),
        }
        for name, (content, _) in cases.items():
            (tmp_path / name).write_bytes(content)
        found = {name: readiness(tmp_path / name) for name in cases}
        assert found == {name: verdict for name, (_, verdict) in cases.items()}
        assert readiness(tmp_path / "missing.npy") is Readiness.CHANGED

    def test_a_long_header_length_is_refused_before_reading(self, tmp_path: Path) -> None:
        """A 4 GiB header length field is CORRUPT without reading the file into memory."""
        path = tmp_path / "long.npy"
        path.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFFF) + bytes(20 << 20))
        tracemalloc.start()
        try:
            verdict = readiness(path)
            error = rejection(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert verdict is Readiness.NEVER
        assert error.code is ErrorCode.CORRUPT
        assert peak < 1 << 20


class TestHostileFiles:
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

    def test_a_fifo_swapped_in_after_the_lstat_does_not_block(self, tmp_path: Path) -> None:
        """The check opens without blocking: a FIFO with no writer is "changed", at once."""
        path = tmp_path / "x.npy"
        os.mkfifo(path)
        started = time.monotonic()
        assert readiness(path) is Readiness.CHANGED
        assert time.monotonic() - started < 1
