"""Loading and validating inputs: hostile files, the .npz size checks, safe opening."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from niftidrop.arrays import open_input
from niftidrop.completeness import Readiness, is_complete, readiness
from niftidrop.errors import ErrorCode
from niftidrop.npy_header import MAX_DIMS
from npy_inputs import LIMIT, header_bytes, npy_bytes, rejection


class TestOpenNpy:
    def test_npy_is_memory_mapped_not_loaded(self, tmp_path: Path) -> None:
        """A .npy is mapped (no copy) with its shape, dtype and Fortran order."""
        path = tmp_path / "a.npy"
        array = np.asfortranarray(np.arange(24, dtype=">i4").reshape(2, 3, 4))
        np.save(path, array)
        source = open_input(path, npz_key=None, max_input_bytes=LIMIT)
        assert source.mapping is not None
        assert source.data.dtype == np.dtype(">i4")
        assert source.data.flags.f_contiguous
        np.testing.assert_array_equal(source.data, array)
        source.release_pages()  # harmless while views are alive

    def test_truncated_npy(self, tmp_path: Path) -> None:
        """A .npy shorter than its header declares is TRUNCATED, naming the file."""
        path = tmp_path / "cut.npy"
        path.write_bytes(npy_bytes(np.zeros((10, 10)))[:-8])
        error = rejection(path)
        assert error.code is ErrorCode.TRUNCATED
        assert "cut.npy" in str(error)

    def test_garbage_is_corrupt(self, tmp_path: Path) -> None:
        """Bytes that are not a .npy header are CORRUPT."""
        path = tmp_path / "bad.npy"
        path.write_bytes(b"not an array at all" * 10)
        assert rejection(path).code is ErrorCode.CORRUPT

    def test_pickled_object_array_is_refused_without_unpickling(self, tmp_path: Path) -> None:
        """An object array (a pickle) is UNSUPPORTED_DTYPE, read from the header only."""
        path = tmp_path / "evil.npy"
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        error = rejection(path)
        assert error.code is ErrorCode.UNSUPPORTED_DTYPE
        assert "'|O'" in str(error)

    @pytest.mark.parametrize(
        "array",
        [
            np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),
            np.array(["a", "bc"]),
            np.zeros(3, dtype="datetime64[s]"),
        ],
        ids=["structured", "strings", "datetime"],
    )
    def test_non_numeric_dtypes(self, tmp_path: Path, array: np.ndarray) -> None:
        """Records, strings and dates are UNSUPPORTED_DTYPE."""
        path = tmp_path / "x.npy"
        np.save(path, array)
        assert rejection(path).code is ErrorCode.UNSUPPORTED_DTYPE

    @pytest.mark.parametrize("shape", [(), (0, 4, 4), (1,) * (MAX_DIMS + 1)])
    def test_bad_shapes(self, tmp_path: Path, shape: tuple[int, ...]) -> None:
        """0-d, zero-voxel and 8-d arrays are BAD_SHAPE, naming the shape."""
        path = tmp_path / "x.npy"
        np.save(path, np.zeros(shape, np.uint8))
        error = rejection(path)
        assert error.code is ErrorCode.BAD_SHAPE
        assert str(shape) in str(error)

    @pytest.mark.parametrize("suffix", [".npy", ".npz"])
    def test_negative_dimension(self, tmp_path: Path, suffix: str) -> None:
        """A header declaring a negative length is BAD_SHAPE, in a .npy and in a .npz."""
        header = header_bytes({"descr": "<u1", "fortran_order": False, "shape": (-5,)}, (1, 0))
        path = tmp_path / f"x{suffix}"
        if suffix == ".npy":
            path.write_bytes(header)
        else:
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr("x.npy", header)
        error = rejection(path)
        assert error.code is ErrorCode.BAD_SHAPE
        assert "(-5,)" in str(error)

    def test_declared_size_over_limit(self, tmp_path: Path) -> None:
        """A .npy declaring more than max_input_bytes is TOO_LARGE (before mapping)."""
        path = tmp_path / "big.npy"
        np.save(path, np.zeros((10, 10), np.float64))
        assert rejection(path, limit=799).code is ErrorCode.TOO_LARGE

    def test_unknown_extension(self, tmp_path: Path) -> None:
        """Only .npy and .npz are read."""
        path = tmp_path / "x.pkl"
        path.write_bytes(pickle.dumps([1, 2]))
        assert rejection(path).code is ErrorCode.UNSAFE_INPUT


class TestOpenNpz:
    def test_first_stored_array_is_used(self, tmp_path: Path) -> None:
        """Without npz_key the first member in the archive is the input."""
        path = tmp_path / "a.npz"
        np.savez(path, zeta=np.ones(3), alpha=np.zeros(4))
        np.testing.assert_array_equal(open_input(path, npz_key=None, max_input_bytes=LIMIT).data, 1)

    def test_npz_key_selects_member_and_missing_key_fails(self, tmp_path: Path) -> None:
        """npz_key picks a member; an absent key is NPZ_KEY_MISSING listing the keys."""
        path = tmp_path / "a.npz"
        np.savez(path, probs=np.ones(3), labels=np.zeros(4))
        assert open_input(path, npz_key="labels", max_input_bytes=LIMIT).shape == (4,)
        error = rejection(path, npz_key="logits")
        assert error.code is ErrorCode.NPZ_KEY_MISSING
        assert "probs" in str(error)

    def test_empty_npz(self, tmp_path: Path) -> None:
        """An archive without arrays is EMPTY_NPZ."""
        path = tmp_path / "e.npz"
        np.savez(path)
        assert rejection(path).code is ErrorCode.EMPTY_NPZ

    def test_corrupt_npz(self, tmp_path: Path) -> None:
        """A .npz that is not a zip archive is CORRUPT."""
        path = tmp_path / "c.npz"
        path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
        assert rejection(path).code is ErrorCode.CORRUPT

    def test_pickled_member_is_refused(self, tmp_path: Path) -> None:
        """An object-array member is UNSUPPORTED_DTYPE, never unpickled."""
        path = tmp_path / "evil.npz"
        np.savez(path, x=np.array([object()], dtype=object))
        assert rejection(path).code is ErrorCode.UNSUPPORTED_DTYPE

    def test_huge_declared_member_is_refused_before_decompressing(self, tmp_path: Path) -> None:
        """A member whose .npy header declares 64 TiB is TOO_LARGE without inflating it."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 20, 1 << 20, 8)}
        )
        path = tmp_path / "bomb.npz"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("x.npy", header.getvalue() + b"\0" * 1_000_000)
        error = rejection(path)
        assert error.code is ErrorCode.TOO_LARGE
        assert "bomb.npz[x]" in str(error)

    def test_member_over_limit_by_zip_size(self, tmp_path: Path) -> None:
        """A member whose zip-declared size exceeds the limit is TOO_LARGE."""
        path = tmp_path / "a.npz"
        np.savez_compressed(path, x=np.zeros(100_000))
        assert rejection(path, limit=1000).code is ErrorCode.TOO_LARGE

    def test_member_shorter_than_its_header(self, tmp_path: Path) -> None:
        """A member with fewer data bytes than its header declares is CORRUPT."""
        data = npy_bytes(np.zeros(100))[:-16]
        path = tmp_path / "short.npz"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", data)
        assert rejection(path).code is ErrorCode.CORRUPT

    def test_member_with_bad_header_is_corrupt(self, tmp_path: Path) -> None:
        """A member that is not a .npy is CORRUPT."""
        path = tmp_path / "x.npz"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", struct.pack("<10I", *range(10)))
        assert rejection(path).code is ErrorCode.CORRUPT


class TestNeverCrashes:
    def test_damaged_deflate_data_is_corrupt(self, tmp_path: Path) -> None:
        """A member whose compressed bytes are damaged is CORRUPT, not a zlib crash."""
        path = tmp_path / "d.npz"
        np.savez_compressed(path, x=np.random.default_rng(0).random(50_000))
        raw = bytearray(path.read_bytes())
        for offset in range(200, 2000):
            raw[offset] ^= 0xFF
        path.write_bytes(bytes(raw))
        assert rejection(path).code is ErrorCode.CORRUPT

    def test_absurd_declared_shape_does_not_overflow(self, tmp_path: Path) -> None:
        """A header declaring 2**120 bytes is TOO_LARGE (no integer wrap-around)."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f8", "fortran_order": False, "shape": (2**40, 2**40, 2**40)}
        )
        path = tmp_path / "huge.npy"
        path.write_bytes(header.getvalue() + b"\0" * 64)
        assert rejection(path).code is ErrorCode.TOO_LARGE
        assert not is_complete(path)


def _member_declaring(path: Path, declared: int, *, stored: bool = False) -> None:
    """A small .npz whose one member says (zip directory and .npy header) `declared` bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (declared - 128,)}
    )
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(2000))
    raw = bytearray(path.read_bytes())
    size = struct.pack("<L", declared)
    raw[22:26] = size  # local header: uncompressed size
    central = raw.rindex(b"PK\x01\x02")
    raw[central + 24 : central + 28] = size  # central directory: uncompressed size
    path.write_bytes(bytes(raw))


class TestImpossibleSizes:
    def test_a_tiny_npz_declaring_gigabytes_is_corrupt_before_allocating(
        self, tmp_path: Path
    ) -> None:
        """2.5 KB cannot inflate to 3 GiB (deflate's limit is 1032:1): CORRUPT, no allocation."""
        path = tmp_path / "bomb.npz"
        _member_declaring(path, 3 << 30)
        assert path.stat().st_size < 2600
        tracemalloc.start()
        try:
            error = rejection(path, limit=16 << 30)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert error.code is ErrorCode.CORRUPT
        assert "compressed bytes" in str(error)
        assert peak < 16 << 20

    def test_a_stored_member_must_hold_its_declared_size(self, tmp_path: Path) -> None:
        """A stored (uncompressed) member declaring more than its stored bytes is CORRUPT."""
        path = tmp_path / "stored.npz"
        _member_declaring(path, 100_000, stored=True)
        assert rejection(path).code is ErrorCode.CORRUPT

    def test_a_member_must_hold_what_its_header_declares(self, tmp_path: Path) -> None:
        """A member whose .npy header declares more data than the member holds is CORRUPT."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 24,)}
        )
        path = tmp_path / "liar.npz"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("x.npy", header.getvalue() + bytes(64))
        tracemalloc.start()
        try:
            error = rejection(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert error.code is ErrorCode.CORRUPT
        assert peak < 16 << 20

    def test_unknown_compression_methods_are_corrupt(self, tmp_path: Path) -> None:
        """Only what numpy writes (stored, deflated): a bzip2 member has no bound."""
        path = tmp_path / "b.npz"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as archive:
            archive.writestr("x.npy", npy_bytes(np.zeros(4)))
        assert "compression method" in str(rejection(path))

    def test_unknown_zip_version_is_corrupt(self, tmp_path: Path) -> None:
        """A directory needing zip version 10.3 (zipfile: NotImplementedError) is CORRUPT."""
        path = tmp_path / "v.npz"
        np.savez(path, x=np.zeros(4))
        raw = bytearray(path.read_bytes())
        raw[raw.rindex(b"PK\x01\x02") + 6] = 103
        path.write_bytes(bytes(raw))
        assert readiness(path) is Readiness.NEVER
        assert rejection(path).code is ErrorCode.CORRUPT


class TestOpening:
    def test_a_fifo_is_refused_without_blocking(self, tmp_path: Path) -> None:
        """A FIFO (no writer) is UNSAFE_INPUT at once: opening never waits for a writer."""
        path = tmp_path / "f.npy"
        os.mkfifo(path)
        error = rejection(path)
        assert error.code is ErrorCode.UNSAFE_INPUT
        assert "named pipe" in str(error)

    def test_a_symlink_is_not_followed(self, tmp_path: Path) -> None:
        """A symlink, even to a valid input, is UNSAFE_INPUT."""
        np.save(tmp_path / "real.npy", np.zeros(3))
        (tmp_path / "link.npy").symlink_to(tmp_path / "real.npy")
        assert rejection(tmp_path / "link.npy").code is ErrorCode.UNSAFE_INPUT
        assert readiness(tmp_path / "link.npy") is Readiness.CHANGED

    def test_an_unreadable_file_is_not_incomplete(self, tmp_path: Path) -> None:
        """A valid input the service may not read is UNREADABLE, and opening it an OSError.

        Checked by a process without the capabilities that let root read anything.
        """
        path = tmp_path / "a.npy"
        np.save(path, np.zeros((4, 4), np.float32))
        path.chmod(0o000)
        script = (
            "import sys; from pathlib import Path\n"
            "from niftidrop.arrays import open_input\n"
            "from niftidrop.completeness import readiness\n"
            "path = Path(sys.argv[1])\n"
            "print(readiness(path).value)\n"
            "try:\n"
            "    open_input(path, npz_key=None, max_input_bytes=1 << 20)\n"
            "except OSError as error:\n"
            "    print(type(error).__name__)\n"
        )
        done = subprocess.run(
            as_a_plain_user([sys.executable, "-c", script, str(path)]),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert done.stdout.split() == ["unreadable", "PermissionError"], done.stderr


def as_a_plain_user(command: list[str]) -> list[str]:
    """`command` without the capabilities that let root read any file (setpriv)."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
