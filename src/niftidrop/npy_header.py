"""The one reader of `.npy` headers, for the readiness check and the conversion alike.

A header is parsed directly when it is exactly as numpy writes it for a plain
numeric array, else by `numpy.lib.format`, so both paths give the same results;
its declared dtype and shape are checked before any data is read (no objects, so
nothing is ever unpickled). The bytes are untrusted: whatever numpy raises while
parsing them is `corrupt`, never a crash.
"""

from __future__ import annotations

import io
import math
import re
import struct
from dataclasses import dataclass
from typing import IO, Any, Final

import numpy as np

from niftidrop.errors import ConversionError, ErrorCode

MAX_DIMS = 7  # NIfTI's dim[0] limit
# A .npy header is at most a few KiB; numpy's own limit guards against absurd ones.
MAX_HEADER_BYTES = 10_000
# The header length field after each known magic string: 2 bytes in version 1.0, 4 after.
_NPY_LENGTH_FIELDS = {
    b"\x93NUMPY\x01\x00": struct.Struct("<H"),
    b"\x93NUMPY\x02\x00": struct.Struct("<I"),
    b"\x93NUMPY\x03\x00": struct.Struct("<I"),
}
_NPY_MAGIC_BYTES = 8
# Enough bytes to hold any header this module accepts.
NPY_PREFIX_BYTES: Final = _NPY_MAGIC_BYTES + 4 + MAX_HEADER_BYTES
# A header as numpy writes it for a plain numeric array: keys sorted, repr() values
# (no leading zeros, a 1-d shape as "(5,)"), then spaces and one newline.
_DIM = rb"(?:0|[1-9][0-9]{0,18})"
_NUMPY_WRITTEN_HEADER = re.compile(
    rb"\{'descr': '([<>|][biufc][0-9]{1,2})', 'fortran_order': (True|False), "
    rb"'shape': (\(\)|\(" + _DIM + rb",\)|\(" + _DIM + rb"(?:, " + _DIM + rb")+\)), \} *\n"
)


@dataclass(frozen=True)
class NpyLayout:
    """What a `.npy` header declares: where the data starts and how it is laid out."""

    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]
    fortran_order: bool
    offset: int

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def file_bytes(self) -> int:
        """The size of the whole `.npy` file: header, then every declared data byte."""
        return self.offset + self.data_bytes


class ShortHeader(Exception):
    """The bytes end before the header does (a file still being written, or cut)."""


def parse_npy_header(raw: bytes, name: str) -> NpyLayout:
    """Shape, Fortran order, dtype and data offset of the `.npy` header `raw` starts with.

    Raises ShortHeader when `raw` ends inside the header, ConversionError CORRUPT
    when no more bytes can make it a header.
    """
    magic = raw[:_NPY_MAGIC_BYTES]
    length_field = _NPY_LENGTH_FIELDS.get(magic)
    if length_field is None:
        if any(known.startswith(magic) for known in _NPY_LENGTH_FIELDS):
            raise ShortHeader
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{name}: expected a .npy header (format 1.0, 2.0 or 3.0), found bytes {magic!r}",
        )
    text_start = _NPY_MAGIC_BYTES + length_field.size
    if len(raw) < text_start:
        raise ShortHeader
    (length,) = length_field.unpack_from(raw, _NPY_MAGIC_BYTES)
    if length > MAX_HEADER_BYTES:
        # numpy would read all of it before checking: refused before reading.
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{name}: expected a .npy header of at most {MAX_HEADER_BYTES} bytes, "
            f"found one that is larger ({length} bytes)",
        )
    offset = text_start + length
    if len(raw) < offset:
        raise ShortHeader
    direct = _numpy_written_header(raw[text_start:offset])
    header = direct if direct is not None else _numpy_reads_header(raw[:offset], name)
    shape, fortran_order, dtype = header
    return NpyLayout(shape=shape, dtype=dtype, fortran_order=fortran_order, offset=offset)


def _numpy_reads_header(raw: bytes, name: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """numpy's own reader on a whole header held in memory (no I/O can fail here)."""
    fmt = np.lib.format
    stream = io.BytesIO(raw)
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            header = fmt.read_array_header_1_0(stream, max_header_size=MAX_HEADER_BYTES)
        else:  # 2.0 and 3.0 share the layout (3.0 only allows UTF-8 field names)
            header = fmt.read_array_header_2_0(stream, max_header_size=MAX_HEADER_BYTES)
        shape, fortran_order, dtype = header
        return tuple(int(n) for n in shape), bool(fortran_order), np.dtype(dtype)
    except MemoryError:
        raise
    # Untrusted bytes: numpy lets through ValueError, SyntaxError, TokenError (an
    # unclosed bracket), IndexError ("'descr': ()"), TypeError, RecursionError...
    except Exception as exc:  # every one of them means "not a header"
        raise ConversionError(
            ErrorCode.CORRUPT, f"{name}: expected a .npy header, found unreadable bytes ({exc})"
        ) from None


def _numpy_written_header(text: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any]] | None:
    """The header dict `text` if it is exactly as numpy writes a plain numeric array.

    numpy's own reader evaluates the header with `ast.literal_eval`, which costs
    more than the rest of opening a small file, and every input is opened twice
    (when checked complete, then when converted). Any other header, valid or not,
    gives None and is left to numpy, so both paths give the same results.
    """
    match = _NUMPY_WRITTEN_HEADER.fullmatch(text)
    if match is None:
        return None
    descr, fortran_order, shape = match.groups()
    try:
        dtype = np.dtype(descr.decode("ascii"))
    except TypeError:  # a size this platform lacks, such as "<f16"
        return None
    dims = tuple(int(dim) for dim in shape[1:-1].split(b",") if dim)
    return dims, fortran_order == b"True", dtype


def _read_numpy_written_header(
    stream: IO[bytes],
) -> tuple[tuple[int, ...], bool, np.dtype[Any]] | None:
    """The header at the stream's position if numpy wrote it for a plain numeric array."""
    try:
        raw = _read_header_bytes(stream)
    except ConversionError:
        return None
    length_field = _NPY_LENGTH_FIELDS.get(raw[:_NPY_MAGIC_BYTES])
    if length_field is None:
        return None
    return _numpy_written_header(raw[_NPY_MAGIC_BYTES + length_field.size :])


def _read_header_bytes(stream: IO[bytes]) -> bytes:
    """The magic, length field and header dict at the stream's position (no more)."""
    raw = stream.read(_NPY_MAGIC_BYTES)
    length_field = _NPY_LENGTH_FIELDS.get(raw)
    if length_field is None:
        return raw
    raw += stream.read(length_field.size)
    if len(raw) == _NPY_MAGIC_BYTES + length_field.size:
        (length,) = length_field.unpack_from(raw, _NPY_MAGIC_BYTES)
        if length <= MAX_HEADER_BYTES:
            raw += stream.read(length)
    return raw


def read_npy_header(stream: IO[bytes], name: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Shape, Fortran order and dtype from a `.npy` header; CORRUPT if unreadable.

    The stream is left at the first data byte.
    """
    raw = _read_header_bytes(stream)  # exactly the header: the stream is at the data
    try:
        layout = parse_npy_header(raw, name)
    except ShortHeader:
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{name}: expected a .npy header, found {len(raw)} bytes that end inside one",
        ) from None
    return layout.shape, layout.fortran_order, layout.dtype


def check_dtype(dtype: np.dtype[Any], name: str) -> None:
    """Only plain numbers and booleans: no objects (pickles), records or strings."""
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biufc":
        raise ConversionError(
            ErrorCode.UNSUPPORTED_DTYPE,
            f"{name}: expected a numeric or boolean array, found dtype {dtype.str!r}",
        )


def check_shape(shape: tuple[int, ...], name: str) -> None:
    """1 to 7 dimensions, each at least 1 long (a header may declare a negative one)."""
    if not 1 <= len(shape) <= MAX_DIMS or min(shape) < 1:
        raise ConversionError(
            ErrorCode.BAD_SHAPE,
            f"{name}: expected 1 to {MAX_DIMS} dimensions and at least one voxel, "
            f"found shape {shape}",
        )


def read_npy_layout(stream: IO[bytes], name: str) -> NpyLayout:
    """The validated header of a `.npy` file open at its start (its length unchecked)."""
    shape, fortran_order, dtype = read_npy_header(stream, name)
    check_dtype(dtype, name)
    return NpyLayout(shape=shape, dtype=dtype, fortran_order=fortran_order, offset=stream.tell())
