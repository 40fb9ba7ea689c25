"""The one .npy header reader: what numpy makes of a header, on either path."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from niftidrop import npy_header
from niftidrop.arrays import open_input
from niftidrop.completeness import is_complete
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.npy_header import MAX_DIMS, MAX_HEADER_BYTES
from npy_inputs import LIMIT, header_bytes, rejection

VERSIONS = [(1, 0), (2, 0), (3, 0)]
Header = tuple[tuple[int, ...], bool, np.dtype]


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
    return npy_header.read_npy_header(stream, "x.npy"), stream.tell()


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
            raw = header_bytes(header, version)
        except ValueError:  # too long for a 2-byte length field
            assume(False)
        raw += b"\0" * 16  # data follows the header
        _assert_same_as_numpy(raw)
        # Plain numbers take the direct path; anything else is left to numpy.
        direct = npy_header._read_numpy_written_header(io.BytesIO(raw))
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
            assert npy_header._read_numpy_written_header(stream) is not None

    @pytest.mark.parametrize("version", VERSIONS)
    def test_every_prefix_of_a_header_is_corrupt(self, version: tuple[int, int]) -> None:
        """A header cut anywhere (magic, length field or dict) is CORRUPT."""
        raw = header_bytes({"descr": "<u1", "fortran_order": False, "shape": (4, 4)}, version)
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
        assert rejection(path).code is ErrorCode.CORRUPT

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
        assert npy_header._read_numpy_written_header(io.BytesIO(raw)) is None
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
            assert npy_header._read_numpy_written_header(stream) == (
                (64, 64, 64),
                False,
                np.dtype("u1"),
            )
            assert stream.tell() == path.stat().st_size - 64**3

    @pytest.mark.parametrize("shape", [(), (5,), (0, 2)])
    def test_zero_and_one_dimensional_shapes(self, shape: tuple[int, ...]) -> None:
        """0-d "()", 1-d "(5,)" and zero-length shapes parse on the direct path."""
        raw = header_bytes({"descr": "<f8", "fortran_order": False, "shape": shape}, (1, 0))
        assert npy_header._read_numpy_written_header(io.BytesIO(raw)) == (
            shape,
            False,
            np.dtype("<f8"),
        )
