"""Loading and validating input arrays (`.npy`, `.npz`) without trusting them.

`.npy` files are never read whole: their header is parsed (directly when it is
exactly as numpy writes it, else with `numpy.lib.format`) and the data is
memory-mapped, so the conversion can stream it slab by slab and drop the pages it
has used. `.npz` members are checked against `max_input_bytes` from the zip
directory and their `.npy` header, then decompressed whole. Nothing here ever
unpickles (`allow_pickle=False` semantics): object dtypes are rejected from the
header, before any data is read.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from niftidrop.errors import ConversionError, ErrorCode

MAX_DIMS = 7  # NIfTI's dim[0] limit
# A .npy header is at most a few KiB; numpy's own limit guards against absurd ones.
MAX_HEADER_BYTES = 10_000
READ_CHUNK_BYTES = 8 * 1024 * 1024
# The header length field after each known magic string: 2 bytes in version 1.0, 4 after.
_NPY_LENGTH_FIELDS = {
    b"\x93NUMPY\x01\x00": struct.Struct("<H"),
    b"\x93NUMPY\x02\x00": struct.Struct("<I"),
    b"\x93NUMPY\x03\x00": struct.Struct("<I"),
}
_NPY_MAGIC_BYTES = 8
# A header as numpy writes it for a plain numeric array: keys sorted, repr() values
# (no leading zeros, a 1-d shape as "(5,)"), then spaces and one newline.
_DIM = rb"(?:0|[1-9][0-9]{0,18})"
_NUMPY_WRITTEN_HEADER = re.compile(
    rb"\{'descr': '([<>|][biufc][0-9]{1,2})', 'fortran_order': (True|False), "
    rb"'shape': (\(\)|\(" + _DIM + rb",\)|\(" + _DIM + rb"(?:, " + _DIM + rb")+\)), \} *\n"
)
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"


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


@dataclass
class InputArray:
    """A validated input: the array (mapped or in memory) and where it came from.

    `mapping` is the read-only memory map behind `data` for `.npy` inputs (None for
    `.npz` members, which live in memory); `release_pages()` drops its resident
    pages so that streaming a large file keeps the process small.
    """

    path: Path
    data: npt.NDArray[np.generic]
    mapping: mmap.mmap | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def dtype(self) -> np.dtype[np.generic]:
        return self.data.dtype

    def release_pages(self) -> None:
        """Tell the kernel we no longer need the mapped pages read so far."""
        if self.mapping is not None:
            self.mapping.madvise(mmap.MADV_DONTNEED)


# Reading headers.


def _read_npy_header(stream: IO[bytes], name: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Shape, Fortran order and dtype from a `.npy` header; CORRUPT if unreadable.

    The stream is left at the first data byte.
    """
    fmt = np.lib.format
    start = stream.tell()
    try:
        header = _read_numpy_written_header(stream)
        if header is None:
            stream.seek(start)
            version = fmt.read_magic(stream)
            if version == (1, 0):
                header = fmt.read_array_header_1_0(stream, max_header_size=MAX_HEADER_BYTES)
            else:  # 2.0 and 3.0 share the layout (3.0 only allows UTF-8 field names)
                header = fmt.read_array_header_2_0(stream, max_header_size=MAX_HEADER_BYTES)
    # numpy lets TokenError (an unclosed bracket) and IndexError ("'descr': ()") through.
    except (
        ValueError,
        OSError,
        EOFError,
        SyntaxError,
        TypeError,
        tokenize.TokenError,
        IndexError,
    ) as exc:
        raise ConversionError(
            ErrorCode.CORRUPT, f"{name}: expected a .npy header, found unreadable bytes ({exc})"
        ) from None
    shape, fortran_order, dtype = header
    return tuple(int(n) for n in shape), bool(fortran_order), dtype


def _read_numpy_written_header(
    stream: IO[bytes],
) -> tuple[tuple[int, ...], bool, np.dtype[Any]] | None:
    """The header if it is exactly as numpy writes a plain numeric array, else None.

    numpy's own reader evaluates the header with `ast.literal_eval`, which costs
    more than the rest of opening a small file, and every input is opened twice
    (when checked complete, then when converted). Any other header, valid or not,
    gives None and is left to numpy, so both paths give the same results.
    """
    length_field = _NPY_LENGTH_FIELDS.get(stream.read(_NPY_MAGIC_BYTES))
    if length_field is None:
        return None
    length_bytes = stream.read(length_field.size)
    if len(length_bytes) != length_field.size:
        return None
    (length,) = length_field.unpack(length_bytes)
    if length > MAX_HEADER_BYTES:
        return None
    text = stream.read(length)
    match = _NUMPY_WRITTEN_HEADER.fullmatch(text) if len(text) == length else None
    if match is None:
        return None
    descr, fortran_order, shape = match.groups()
    try:
        dtype = np.dtype(descr.decode("ascii"))
    except TypeError:  # a size this platform lacks, such as "<f16"
        return None
    dims = tuple(int(dim) for dim in shape[1:-1].split(b",") if dim)
    return dims, fortran_order == b"True", dtype


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


def _check_size(declared: int, limit: int, name: str) -> None:
    if declared > limit:
        raise ConversionError(
            ErrorCode.TOO_LARGE,
            f"{name}: expected at most {limit} bytes (max_input_bytes), "
            f"found an array of {declared} bytes",
        )


def read_npy_layout(stream: IO[bytes], name: str) -> NpyLayout:
    """The validated header of a `.npy` file open at its start (its length unchecked)."""
    shape, fortran_order, dtype = _read_npy_header(stream, name)
    check_dtype(dtype, name)
    return NpyLayout(shape=shape, dtype=dtype, fortran_order=fortran_order, offset=stream.tell())


# Completeness (called by the service on every candidate: cheap, never raises).


def is_complete(path: Path) -> bool:
    """True when the file is structurally whole: .npy header parses and offset + declared
    array bytes == file size; .npz zip central directory reads and every member's declared
    (compressed) bytes are present. False while it may still be growing. Must be cheap
    (reads only headers / the zip directory) and never raise for partial files; it is called
    by the service on every candidate."""
    try:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            with path.open("rb") as stream:
                shape, _, dtype = _read_npy_header(stream, path.name)
                offset = stream.tell()
                size = os.fstat(stream.fileno()).st_size
            declared = math.prod(shape) * dtype.itemsize
            return offset + declared == size
        if suffix == ".npz":
            return _zip_members_present(path)
    except (ConversionError, OSError, ValueError, zipfile.BadZipFile, struct.error):
        return False
    return False


def _zip_members_present(path: Path) -> bool:
    with path.open("rb") as stream, zipfile.ZipFile(stream) as archive:
        directory_start = _directory_offset(archive, stream)
        for info in archive.infolist():
            stream.seek(info.header_offset)
            local = stream.read(_ZIP_LOCAL_HEADER.size)
            if len(local) < _ZIP_LOCAL_HEADER.size or local[:4] != _ZIP_LOCAL_MAGIC:
                return False
            fields = _ZIP_LOCAL_HEADER.unpack(local)
            name_length, extra_length = fields[-2], fields[-1]
            data_start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length
            if data_start + info.compress_size > directory_start:
                return False
    return True


def _directory_offset(archive: zipfile.ZipFile, stream: IO[bytes]) -> int:
    """Where the central directory starts (members must end before it)."""
    # zipfile keeps it privately; the file size is a safe upper bound otherwise.
    start = getattr(archive, "start_dir", None)
    if isinstance(start, int):
        return start
    return os.fstat(stream.fileno()).st_size


# Opening inputs.


def open_input(path: Path, *, npz_key: str | None, max_input_bytes: int) -> InputArray:
    """The validated array of `path`: `.npy` memory-mapped, `.npz` member in memory.

    Raises ConversionError (TRUNCATED, CORRUPT, UNSUPPORTED_DTYPE, BAD_SHAPE,
    TOO_LARGE, EMPTY_NPZ, NPZ_KEY_MISSING); lets OSError through.
    """
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _open_npy(path, max_input_bytes)
    if suffix == ".npz":
        return _open_npz(path, npz_key, max_input_bytes)
    raise ConversionError(
        ErrorCode.UNSAFE_INPUT, f"{path.name}: expected a .npy or .npz file, found {suffix!r}"
    )


def _open_npy(path: Path, max_input_bytes: int) -> InputArray:
    with path.open("rb") as stream:
        layout = read_npy_layout(stream, path.name)
        check_shape(layout.shape, path.name)
        _check_size(layout.data_bytes, max_input_bytes, path.name)
        expected = layout.offset + layout.data_bytes
        size = os.fstat(stream.fileno()).st_size
        if size < expected:
            raise ConversionError(
                ErrorCode.TRUNCATED,
                f"{path.name}: expected {expected} bytes for shape {layout.shape} "
                f"{layout.dtype.str}, found {size}",
            )
        if size > expected:
            raise ConversionError(
                ErrorCode.CORRUPT,
                f"{path.name}: expected {expected} bytes for shape {layout.shape} "
                f"{layout.dtype.str}, found {size} (trailing bytes)",
            )
        mapping = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
    count = math.prod(layout.shape)
    flat = np.frombuffer(mapping, dtype=layout.dtype, count=count, offset=layout.offset)
    data = flat.reshape(layout.shape, order="F" if layout.fortran_order else "C")
    return InputArray(path=path, data=data, mapping=mapping)


def _open_npz(path: Path, npz_key: str | None, max_input_bytes: int) -> InputArray:
    try:
        with zipfile.ZipFile(path) as archive:
            info = _choose_member(archive, npz_key, path.name)
            label = f"{path.name}[{info.filename.removesuffix('.npy')}]"
            _check_size(info.file_size, max_input_bytes + MAX_HEADER_BYTES, label)
            with archive.open(info) as member:
                data = _read_member(member, label, max_input_bytes)
    except zipfile.BadZipFile as exc:
        raise ConversionError(
            ErrorCode.CORRUPT, f"{path.name}: expected a zip archive of .npy arrays ({exc})"
        ) from None
    # Encrypted (RuntimeError), damaged deflate data (zlib.error), unknown compression.
    except (zipfile.LargeZipFile, NotImplementedError, EOFError, RuntimeError, zlib.error) as exc:
        raise ConversionError(
            ErrorCode.CORRUPT, f"{path.name}: unreadable member ({exc})"
        ) from None
    return InputArray(path=path, data=data)


def _choose_member(archive: zipfile.ZipFile, npz_key: str | None, name: str) -> zipfile.ZipInfo:
    arrays = [info for info in archive.infolist() if info.filename.endswith(".npy")]
    if not arrays:
        found = [info.filename for info in archive.infolist()]
        raise ConversionError(
            ErrorCode.EMPTY_NPZ, f"{name}: expected at least one array, found members {found}"
        )
    if npz_key is None:
        return arrays[0]  # the first stored array, as numpy.load lists them
    for info in arrays:
        if info.filename == npz_key + ".npy":
            return info
    keys = [info.filename.removesuffix(".npy") for info in arrays]
    raise ConversionError(
        ErrorCode.NPZ_KEY_MISSING, f"{name}: expected an array named {npz_key!r}, found {keys}"
    )


def _read_member(member: IO[bytes], label: str, max_input_bytes: int) -> npt.NDArray[np.generic]:
    """Read one member after checking its .npy header (size before decompressing)."""
    shape, fortran_order, dtype = _read_npy_header(member, label)
    check_dtype(dtype, label)
    check_shape(shape, label)
    count = math.prod(shape)
    _check_size(count * dtype.itemsize, max_input_bytes, label)
    buffer = bytearray(count * dtype.itemsize)
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        got = len(chunk := member.read(min(len(buffer) - filled, READ_CHUNK_BYTES)))
        if not got:
            raise ConversionError(
                ErrorCode.CORRUPT,
                f"{label}: expected {len(buffer)} bytes for shape {shape} {dtype.str}, "
                f"found {filled}",
            )
        view[filled : filled + got] = chunk
        filled += got
    flat = np.frombuffer(buffer, dtype=dtype, count=count)
    return flat.reshape(shape, order="F" if fortran_order else "C")
