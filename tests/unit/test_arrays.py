"""Loading and validating inputs: completeness, hostile files, the .npz size check."""

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
from hypothesis import assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from niftidrop import arrays
from niftidrop.arrays import (
    MAX_DIMS,
    MAX_HEADER_BYTES,
    Readiness,
    is_complete,
    open_input,
    readiness,
)
from niftidrop.errors import ConversionError, ErrorCode

LIMIT = 1 << 30
VERSIONS = [(1, 0), (2, 0), (3, 0)]
Header = tuple[tuple[int, ...], bool, np.dtype]


def _npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def _header_bytes(header: dict[str, object], version: tuple[int, int]) -> bytes:
    """A .npy header written by numpy itself, in format `version`."""
    stream = io.BytesIO()
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(stream, header)
    else:
        np.lib.format.write_array_header_2_0(stream, header)
    raw = stream.getvalue()
    # 3.0 is 2.0 with another version byte (it only differs for non-ASCII field names).
    return raw[:6] + bytes(version) + raw[8:]


def _hand_written(text: str, version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy header with exactly `text` (padding and newline included) as its dict."""
    raw = text.encode("latin1")
    length = struct.pack("<H" if version == (1, 0) else "<I", len(raw))
    return b"\x93NUMPY" + bytes(version) + length + raw


def _numpy_reads(raw: bytes) -> tuple[Header, int]:
    """What numpy's own reader makes of a header, and where it leaves the stream."""
    stream = io.BytesIO(raw)
    version = np.lib.format.read_magic(stream)
    reader = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran_order, dtype = reader(stream, max_header_size=MAX_HEADER_BYTES)
    return (shape, fortran_order, dtype), stream.tell()


def _we_read(raw: bytes) -> tuple[Header, int]:
    stream = io.BytesIO(raw)
    return arrays._read_npy_header(stream, "x.npy"), stream.tell()


def _assert_same_as_numpy(raw: bytes) -> None:
    """Our parser agrees with numpy's: same header and offset, or CORRUPT when numpy fails."""
    try:
        expected = _numpy_reads(raw)
    except ValueError:
        with pytest.raises(ConversionError) as caught:
            _we_read(raw)
        assert caught.value.code is ErrorCode.CORRUPT
        return
    (shape, fortran_order, dtype), offset = _we_read(raw)
    assert (shape, fortran_order, dtype, offset) == (*expected[0], expected[1])
    assert dtype.str == expected[0][2].str  # byte order too


def _rejection(path: Path, *, npz_key: str | None = None, limit: int = LIMIT) -> ConversionError:
    with pytest.raises(ConversionError) as caught:
        open_input(path, npz_key=npz_key, max_input_bytes=limit)
    return caught.value


class TestIsComplete:
    def test_whole_npy_is_complete(self, tmp_path: Path) -> None:
        """A .npy whose header offset plus data bytes equals its size is complete."""
        path = tmp_path / "a.npy"
        np.save(path, np.zeros((3, 4, 5), np.float32))
        assert is_complete(path)

    def test_every_prefix_of_npy_is_incomplete(self, tmp_path: Path) -> None:
        """A .npy still being written (any shorter prefix) is not complete."""
        whole = _npy_bytes(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
        path = tmp_path / "a.npy"
        for length in (0, 5, 60, 127, 128, len(whole) - 1):
            path.write_bytes(whole[:length])
            assert not is_complete(path), length

    def test_npy_with_trailing_bytes_is_not_complete(self, tmp_path: Path) -> None:
        """More bytes than the header declares is not a structurally whole .npy."""
        path = tmp_path / "a.npy"
        path.write_bytes(_npy_bytes(np.zeros(4)) + b"x")
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


PLAIN_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64, 128)),
    hnp.complex_number_dtypes(endianness="?", sizes=(64, 128, 256)),
)
OTHER_DTYPES = st.one_of(
    hnp.array_dtypes(max_size=4, allow_subarrays=True),
    hnp.nested_dtypes(max_itemsize=64),
    st.just(np.dtype(object)),
    hnp.datetime64_dtypes(endianness="?"),
    hnp.byte_string_dtypes(endianness="?"),
    hnp.unicode_string_dtypes(endianness="?"),
)


class TestNpyHeader:
    @hypothesis_settings(max_examples=400, deadline=None)
    @given(
        shape=st.lists(st.integers(0, 2**40), max_size=MAX_DIMS).map(tuple),
        dtype=st.one_of(PLAIN_DTYPES, OTHER_DTYPES),
        fortran_order=st.booleans(),
        version=st.sampled_from(VERSIONS),
    )
    def test_numpy_written_headers_parse_as_numpy_parses_them(
        self,
        shape: tuple[int, ...],
        dtype: np.dtype,
        fortran_order: bool,
        version: tuple[int, int],
    ) -> None:
        """Any header numpy writes gives numpy's shape, order, dtype and data offset."""
        descr = np.lib.format.dtype_to_descr(dtype)
        header = {"descr": descr, "fortran_order": fortran_order, "shape": shape}
        try:
            raw = _header_bytes(header, version)
        except ValueError:  # too long for a 2-byte length field
            assume(False)
        raw += b"\0" * 16  # data follows the header
        _assert_same_as_numpy(raw)
        # Plain numbers take the direct path; anything else is left to numpy.
        direct = arrays._read_numpy_written_header(io.BytesIO(raw))
        assert (direct is not None) == (isinstance(descr, str) and dtype.kind in "biufc")

    def test_every_descr_of_the_direct_form_parses_as_numpy_parses_it(self) -> None:
        """Each descr the direct path accepts gives numpy's dtype, or numpy's rejection."""
        for order in "<>|":
            for kind in "biufc":
                for size in [*range(100), "00", "08", "016"]:
                    text = f"{{'descr': '{order}{kind}{size}', 'fortran_order': False, "
                    text += "'shape': (3,), }" + " " * 40 + "\n"
                    _assert_same_as_numpy(_hand_written(text))

    @pytest.mark.parametrize("version", VERSIONS)
    def test_files_in_every_version_open(self, tmp_path: Path, version: tuple[int, int]) -> None:
        """Format 1.0, 2.0 and 3.0 files written by numpy are complete and open the same."""
        array = np.asfortranarray(np.arange(60, dtype=">f4").reshape(3, 4, 5))
        path = tmp_path / "a.npy"
        with path.open("wb") as stream:
            np.lib.format.write_array(stream, array, version=version)
        assert path.read_bytes()[6:8] == bytes(version)
        assert is_complete(path)
        source = open_input(path, npz_key=None, max_input_bytes=LIMIT)
        assert source.data.dtype == np.dtype(">f4")
        np.testing.assert_array_equal(source.data, array)
        with path.open("rb") as stream:
            assert arrays._read_numpy_written_header(stream) is not None

    @pytest.mark.parametrize("version", VERSIONS)
    def test_every_prefix_of_a_header_is_corrupt(self, version: tuple[int, int]) -> None:
        """A header cut anywhere (magic, length field or dict) is CORRUPT."""
        raw = _header_bytes({"descr": "<u1", "fortran_order": False, "shape": (4, 4)}, version)
        for length in range(len(raw)):
            with pytest.raises(ConversionError) as caught:
                _we_read(raw[:length])
            assert caught.value.code is ErrorCode.CORRUPT, length

    @pytest.mark.parametrize(
        "text",
        [
            "{'descr': '<u1', 'fortran_order': False, 'shape': (5), }  \n",  # an int
            "{'descr': '<u1', 'fortran_order': False, 'shape': (07,), }  \n",
            "{'descr': '<u1', 'fortran_order': 0, 'shape': (5,), }  \n",
            "{'descr': '<u1', 'shape': (5,), }  \n",
            "{'descr': '<u1', 'fortran_order': False, 'shape': (5,), 'x': 1}\n",
            "{'descr': '<i3', 'fortran_order': False, 'shape': (5,), }  \n",
            "['descr', '<u1']\n",
            "{'descr': '<u1', 'fortran_order': False, 'shape': (5,), \n",  # unclosed
            "{'descr': (), 'fortran_order': False, 'shape': (5,)}\n",
            "\xff\xfe garbage",
        ],
    )
    def test_malformed_headers_are_corrupt(self, text: str) -> None:
        """Headers numpy refuses are CORRUPT, whatever path looked at them first."""
        with pytest.raises(ConversionError) as caught:
            _we_read(_hand_written(text) + b"\0" * 5)
        assert caught.value.code is ErrorCode.CORRUPT

    def test_unclosed_header_is_incomplete_not_an_exception(self, tmp_path: Path) -> None:
        """A header numpy's reader fails on with a TokenError is simply not complete."""
        path = tmp_path / "a.npy"
        path.write_bytes(_hand_written("{'descr': '<u1', 'shape': (5,\n") + b"\0" * 5)
        assert not is_complete(path)
        assert _rejection(path).code is ErrorCode.CORRUPT

    def test_header_over_the_limit_is_corrupt(self) -> None:
        """A header longer than MAX_HEADER_BYTES is CORRUPT, even in the direct form."""
        text = "{'descr': '<u1', 'fortran_order': False, 'shape': (5,), }"
        raw = _hand_written(text + " " * MAX_HEADER_BYTES + "\n", (2, 0))
        with pytest.raises(ConversionError) as caught:
            _we_read(raw + b"\0" * 5)
        assert caught.value.code is ErrorCode.CORRUPT
        assert "is large" in str(caught.value)  # numpy's own limit message

    def test_version_2_header_over_64_kib_is_corrupt(self) -> None:
        """numpy writes a header over 65535 bytes as 2.0; past the limit it is CORRUPT."""
        dtype = np.dtype([(f"field{number}", "<f4") for number in range(4000)])
        stream = io.BytesIO()
        with pytest.warns(UserWarning, match=r"format 2\.0"):
            np.save(stream, np.zeros(1, dtype))
        raw = stream.getvalue()
        assert raw[6:8] == b"\x02\x00"
        assert struct.unpack("<I", raw[8:12])[0] > 65535
        with pytest.raises(ConversionError) as caught:
            _we_read(raw)
        assert caught.value.code is ErrorCode.CORRUPT

    @pytest.mark.parametrize(
        "text",
        [
            "{'shape': (2, 3), 'fortran_order': True, 'descr': '>i2'}\n",
            "{'descr':'>i2','fortran_order':True,'shape':(2,3)}        \n",
            "{ 'descr': '>i2', 'fortran_order': True, 'shape': (2, 3,), }\n",
            '{"descr": ">i2", "fortran_order": True, "shape": (2, 3), }\n',
            "{'descr': '>i2', 'fortran_order': True, 'shape': (2, 3), }\n\n",
            "{'descr': '>i2', 'fortran_order': True, 'shape': (2, 3), }\t\n",
        ],
    )
    def test_other_valid_headers_parse_through_numpy(self, text: str) -> None:
        """Headers numpy would not write but accepts still parse, by numpy's reader."""
        raw = _hand_written(text) + b"\0" * 12
        assert arrays._read_numpy_written_header(io.BytesIO(raw)) is None
        assert _we_read(raw) == (((2, 3), True, np.dtype(">i2")), len(raw) - 12)

    @hypothesis_settings(max_examples=200, deadline=None)
    @given(
        shape=st.lists(st.integers(0, 99), max_size=4).map(tuple),
        dtype=PLAIN_DTYPES,
        fortran_order=st.booleans(),
        layout=st.tuples(
            st.permutations(["descr", "fortran_order", "shape"]),
            st.lists(st.sampled_from(["", " ", "  "]), min_size=4, max_size=4),
            st.sampled_from(["", ","]),
        ),
    )
    def test_rewritten_headers_parse_as_numpy_parses_them(
        self,
        shape: tuple[int, ...],
        dtype: np.dtype,
        fortran_order: bool,
        layout: tuple[list[str], list[str], str],
    ) -> None:
        """Valid headers in another key order or spacing give numpy's result."""
        order, spaces, trailing_comma = layout
        values = {"descr": dtype.str, "fortran_order": fortran_order, "shape": shape}
        items = [f"{spaces[0]}{key!r}:{spaces[1]}{values[key]!r}" for key in order]
        text = "{" + f",{spaces[2]}".join(items) + trailing_comma
        text += spaces[3] + "}" + " " * 10 + "\n"
        _assert_same_as_numpy(_hand_written(text) + b"\0" * 3)

    def test_saved_npy_takes_the_direct_path(self, tmp_path: Path) -> None:
        """np.save's header is read without numpy's parser, and the stream ends at the data."""
        path = tmp_path / "a.npy"
        np.save(path, np.zeros((64, 64, 64), np.uint8))
        with path.open("rb") as stream:
            assert arrays._read_numpy_written_header(stream) == (
                (64, 64, 64),
                False,
                np.dtype("u1"),
            )
            assert stream.tell() == path.stat().st_size - 64**3

    @pytest.mark.parametrize("shape", [(), (5,), (0, 2)])
    def test_zero_and_one_dimensional_shapes(self, shape: tuple[int, ...]) -> None:
        """0-d "()", 1-d "(5,)" and zero-length shapes parse on the direct path."""
        raw = _header_bytes({"descr": "<f8", "fortran_order": False, "shape": shape}, (1, 0))
        assert arrays._read_numpy_written_header(io.BytesIO(raw)) == (
            shape,
            False,
            np.dtype("<f8"),
        )


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
        path.write_bytes(_npy_bytes(np.zeros((10, 10)))[:-8])
        error = _rejection(path)
        assert error.code is ErrorCode.TRUNCATED
        assert "cut.npy" in str(error)

    def test_garbage_is_corrupt(self, tmp_path: Path) -> None:
        """Bytes that are not a .npy header are CORRUPT."""
        path = tmp_path / "bad.npy"
        path.write_bytes(b"not an array at all" * 10)
        assert _rejection(path).code is ErrorCode.CORRUPT

    def test_pickled_object_array_is_refused_without_unpickling(self, tmp_path: Path) -> None:
        """An object array (a pickle) is UNSUPPORTED_DTYPE, read from the header only."""
        path = tmp_path / "evil.npy"
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        error = _rejection(path)
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
        assert _rejection(path).code is ErrorCode.UNSUPPORTED_DTYPE

    @pytest.mark.parametrize("shape", [(), (0, 4, 4), (1,) * (MAX_DIMS + 1)])
    def test_bad_shapes(self, tmp_path: Path, shape: tuple[int, ...]) -> None:
        """0-d, zero-voxel and 8-d arrays are BAD_SHAPE, naming the shape."""
        path = tmp_path / "x.npy"
        np.save(path, np.zeros(shape, np.uint8))
        error = _rejection(path)
        assert error.code is ErrorCode.BAD_SHAPE
        assert str(shape) in str(error)

    @pytest.mark.parametrize("suffix", [".npy", ".npz"])
    def test_negative_dimension(self, tmp_path: Path, suffix: str) -> None:
        """A header declaring a negative length is BAD_SHAPE, in a .npy and in a .npz."""
        header = _header_bytes({"descr": "<u1", "fortran_order": False, "shape": (-5,)}, (1, 0))
        path = tmp_path / f"x{suffix}"
        if suffix == ".npy":
            path.write_bytes(header)
        else:
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr("x.npy", header)
        error = _rejection(path)
        assert error.code is ErrorCode.BAD_SHAPE
        assert "(-5,)" in str(error)

    def test_declared_size_over_limit(self, tmp_path: Path) -> None:
        """A .npy declaring more than max_input_bytes is TOO_LARGE (before mapping)."""
        path = tmp_path / "big.npy"
        np.save(path, np.zeros((10, 10), np.float64))
        assert _rejection(path, limit=799).code is ErrorCode.TOO_LARGE

    def test_unknown_extension(self, tmp_path: Path) -> None:
        """Only .npy and .npz are read."""
        path = tmp_path / "x.pkl"
        path.write_bytes(pickle.dumps([1, 2]))
        assert _rejection(path).code is ErrorCode.UNSAFE_INPUT


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
        error = _rejection(path, npz_key="logits")
        assert error.code is ErrorCode.NPZ_KEY_MISSING
        assert "probs" in str(error)

    def test_empty_npz(self, tmp_path: Path) -> None:
        """An archive without arrays is EMPTY_NPZ."""
        path = tmp_path / "e.npz"
        np.savez(path)
        assert _rejection(path).code is ErrorCode.EMPTY_NPZ

    def test_corrupt_npz(self, tmp_path: Path) -> None:
        """A .npz that is not a zip archive is CORRUPT."""
        path = tmp_path / "c.npz"
        path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
        assert _rejection(path).code is ErrorCode.CORRUPT

    def test_pickled_member_is_refused(self, tmp_path: Path) -> None:
        """An object-array member is UNSUPPORTED_DTYPE, never unpickled."""
        path = tmp_path / "evil.npz"
        np.savez(path, x=np.array([object()], dtype=object))
        assert _rejection(path).code is ErrorCode.UNSUPPORTED_DTYPE

    def test_huge_declared_member_is_refused_before_decompressing(self, tmp_path: Path) -> None:
        """A member whose .npy header declares 64 TiB is TOO_LARGE without inflating it."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 20, 1 << 20, 8)}
        )
        path = tmp_path / "bomb.npz"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("x.npy", header.getvalue() + b"\0" * 1_000_000)
        error = _rejection(path)
        assert error.code is ErrorCode.TOO_LARGE
        assert "bomb.npz[x]" in str(error)

    def test_member_over_limit_by_zip_size(self, tmp_path: Path) -> None:
        """A member whose zip-declared size exceeds the limit is TOO_LARGE."""
        path = tmp_path / "a.npz"
        np.savez_compressed(path, x=np.zeros(100_000))
        assert _rejection(path, limit=1000).code is ErrorCode.TOO_LARGE

    def test_member_shorter_than_its_header(self, tmp_path: Path) -> None:
        """A member with fewer data bytes than its header declares is CORRUPT."""
        data = _npy_bytes(np.zeros(100))[:-16]
        path = tmp_path / "short.npz"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", data)
        assert _rejection(path).code is ErrorCode.CORRUPT

    def test_member_with_bad_header_is_corrupt(self, tmp_path: Path) -> None:
        """A member that is not a .npy is CORRUPT."""
        path = tmp_path / "x.npz"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", struct.pack("<10I", *range(10)))
        assert _rejection(path).code is ErrorCode.CORRUPT


class TestNeverCrashes:
    def test_damaged_deflate_data_is_corrupt(self, tmp_path: Path) -> None:
        """A member whose compressed bytes are damaged is CORRUPT, not a zlib crash."""
        path = tmp_path / "d.npz"
        np.savez_compressed(path, x=np.random.default_rng(0).random(50_000))
        raw = bytearray(path.read_bytes())
        for offset in range(200, 2000):
            raw[offset] ^= 0xFF
        path.write_bytes(bytes(raw))
        assert _rejection(path).code is ErrorCode.CORRUPT

    def test_absurd_declared_shape_does_not_overflow(self, tmp_path: Path) -> None:
        """A header declaring 2**120 bytes is TOO_LARGE (no integer wrap-around)."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f8", "fortran_order": False, "shape": (2**40, 2**40, 2**40)}
        )
        path = tmp_path / "huge.npy"
        path.write_bytes(header.getvalue() + b"\0" * 64)
        assert _rejection(path).code is ErrorCode.TOO_LARGE
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
            error = _rejection(path, limit=16 << 30)
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
        assert _rejection(path).code is ErrorCode.CORRUPT

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
            error = _rejection(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert error.code is ErrorCode.CORRUPT
        assert peak < 16 << 20

    def test_unknown_compression_methods_are_corrupt(self, tmp_path: Path) -> None:
        """Only what numpy writes (stored, deflated): a bzip2 member has no bound."""
        path = tmp_path / "b.npz"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as archive:
            archive.writestr("x.npy", _npy_bytes(np.zeros(4)))
        assert "compression method" in str(_rejection(path))

    def test_unknown_zip_version_is_corrupt(self, tmp_path: Path) -> None:
        """A directory needing zip version 10.3 (zipfile: NotImplementedError) is CORRUPT."""
        path = tmp_path / "v.npz"
        np.savez(path, x=np.zeros(4))
        raw = bytearray(path.read_bytes())
        raw[raw.rindex(b"PK\x01\x02") + 6] = 103
        path.write_bytes(bytes(raw))
        assert readiness(path) is Readiness.NEVER
        assert _rejection(path).code is ErrorCode.CORRUPT


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
        assert _rejection(path).code is ErrorCode.CORRUPT

    def test_verdicts(self, tmp_path: Path) -> None:
        """Whole, still growing, never whole: each file gets the verdict it deserves."""
        whole = _npy_bytes(np.arange(60, dtype=np.int16))
        cases = {
            "whole.npy": (whole, Readiness.COMPLETE),
            "growing.npy": (whole[:-1], Readiness.INCOMPLETE),
            "magic.npy": (whole[:3], Readiness.INCOMPLETE),
            "empty.npy": (b"", Readiness.INCOMPLETE),
            "header.npy": (whole[:50], Readiness.INCOMPLETE),
            "trailing.npy": (whole + b"x", Readiness.NEVER),
            "text.npy": (b"hello, world", Readiness.NEVER),
            "version.npy": (b"\x93NUMPY\x09\x00" + whole[8:], Readiness.NEVER),
            "pickle.npy": (_npy_bytes(np.array([None, 1], dtype=object)), Readiness.NEVER),
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
            error = _rejection(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert verdict is Readiness.NEVER
        assert error.code is ErrorCode.CORRUPT
        assert peak < 1 << 20


class TestOpening:
    def test_a_fifo_is_refused_without_blocking(self, tmp_path: Path) -> None:
        """A FIFO (no writer) is UNSAFE_INPUT at once: opening never waits for a writer."""
        path = tmp_path / "f.npy"
        os.mkfifo(path)
        error = _rejection(path)
        assert error.code is ErrorCode.UNSAFE_INPUT
        assert "named pipe" in str(error)

    def test_a_symlink_is_not_followed(self, tmp_path: Path) -> None:
        """A symlink, even to a valid input, is UNSAFE_INPUT."""
        np.save(tmp_path / "real.npy", np.zeros(3))
        (tmp_path / "link.npy").symlink_to(tmp_path / "real.npy")
        assert _rejection(tmp_path / "link.npy").code is ErrorCode.UNSAFE_INPUT
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
            "from niftidrop.arrays import readiness, open_input\n"
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
