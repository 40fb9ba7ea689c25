"""Loading and validating input arrays (`.npy`, `.npz`) without trusting them.

Everything that reads a file from the inbox goes through this module: the
readiness check (`readiness`: cheap, never raises) and the conversion
(`open_input`). Both open files the same way (`open_regular`: never following
a symlink, never blocking on a FIFO, regular files only) and both read `.npy`
headers with one reader, so no header can be harmless to one and fatal to the
other.

`.npy` files are never read whole: their header is parsed (directly when it is
exactly as numpy writes it, else with `numpy.lib.format`) and the data is
memory-mapped, so the conversion can stream it slab by slab and drop the pages it
has used. `.npz` members are checked against `max_input_bytes`, against what
their compressed size makes possible and against their `.npy` header before
anything is allocated, then decompressed whole. Nothing here ever unpickles
(`allow_pickle=False` semantics): object dtypes are rejected from the header,
before any data is read.

The bytes are untrusted: whatever a library raises while parsing them (numpy's
header reader, `zipfile`, `zlib`) is an input error, `corrupt`, never a crash.
"""

from __future__ import annotations

import errno
import io
import math
import mmap
import os
import re
import stat
import struct
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Any, BinaryIO, Final

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
# Enough bytes to hold any header this module accepts.
_NPY_PREFIX_BYTES: Final = _NPY_MAGIC_BYTES + 4 + MAX_HEADER_BYTES
# A header as numpy writes it for a plain numeric array: keys sorted, repr() values
# (no leading zeros, a 1-d shape as "(5,)"), then spaces and one newline.
_DIM = rb"(?:0|[1-9][0-9]{0,18})"
_NUMPY_WRITTEN_HEADER = re.compile(
    rb"\{'descr': '([<>|][biufc][0-9]{1,2})', 'fortran_order': (True|False), "
    rb"'shape': (\(\)|\(" + _DIM + rb",\)|\(" + _DIM + rb"(?:, " + _DIM + rb")+\)), \} *\n"
)
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"
# The end-of-central-directory record: signature, disk numbers, entry counts,
# directory size and offset, comment length; it ends the file, but for a comment.
_ZIP_END = struct.Struct("<4s4H2LH")
_ZIP_END_MAGIC = b"PK\x05\x06"
# zip64: a locator just before that record points to a record with 64-bit sizes.
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_MAGIC = b"PK\x06\x07"
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_ZIP64_END_MAGIC = b"PK\x06\x06"
_ZIP_END_SEARCH_BYTES: Final = _ZIP_END.size + 0xFFFF  # the record plus the longest comment
# The readiness check runs on the service's main thread: it parses a zip directory
# only up to this size (about 1,400 members); past it, it checks that the directory
# is in the file and leaves the members to the conversion. A 500,000-member
# directory takes seconds to parse.
MAX_CHECKED_DIRECTORY_BYTES: Final = 64 * 1024
# The conversion refuses a zip directory larger than this (about 1.4 million
# members) rather than hold it in memory.
MAX_DIRECTORY_BYTES: Final = 64 * 1024 * 1024
# Deflate cannot expand data more than 1032:1 (its longest match, 258 bytes, costs
# at least 2 bits; zlib's technical notes give the same limit), so a deflated member
# declaring more is impossible. The slack covers tiny streams.
_DEFLATE_MAX_RATIO: Final = 1032
_DEFLATE_SLACK_BYTES: Final = 1024

# How inbox files are opened: never through a symlink (ELOOP), never waiting for
# the writer of a FIFO (O_NONBLOCK), never inherited by child processes.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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


# Opening inbox files.


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for messages."""
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def open_regular(path: Path) -> BinaryIO:
    """`path` open for reading, if it is a regular file (UNSAFE_INPUT otherwise).

    A plain `open` follows a symlink swapped in after the caller's `lstat` and
    blocks forever on a FIFO; this opens without following or blocking and checks
    what it opened. Other OSErrors (EACCES, ENOENT, EIO) are let through.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        kind = "symbolic link"
    except ValueError as error:  # a NUL byte in the name
        raise ConversionError(ErrorCode.UNSAFE_INPUT, f"{path.name!r}: {error}") from None
    else:
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        kind = file_kind(mode)
    raise ConversionError(
        ErrorCode.UNSAFE_INPUT,
        f"{path.name}: expected a regular file, found a {kind}; it is not followed",
    )


# Reading headers.


class _ShortHeader(Exception):
    """The bytes end before the header does (a file still being written, or cut)."""


def _parse_npy_header(raw: bytes, name: str) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """Shape, Fortran order, dtype and data offset of the `.npy` header `raw` starts with.

    Raises _ShortHeader when `raw` ends inside the header, ConversionError CORRUPT
    when no more bytes can make it a header.
    """
    magic = raw[:_NPY_MAGIC_BYTES]
    length_field = _NPY_LENGTH_FIELDS.get(magic)
    if length_field is None:
        if any(known.startswith(magic) for known in _NPY_LENGTH_FIELDS):
            raise _ShortHeader
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{name}: expected a .npy header (format 1.0, 2.0 or 3.0), found bytes {magic!r}",
        )
    text_start = _NPY_MAGIC_BYTES + length_field.size
    if len(raw) < text_start:
        raise _ShortHeader
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
        raise _ShortHeader
    direct = _numpy_written_header(raw[text_start:offset])
    if direct is not None:
        return (*direct, offset)
    shape, fortran_order, dtype = _numpy_reads_header(raw[:offset], name)
    return shape, fortran_order, dtype, offset


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


def _read_npy_header(stream: IO[bytes], name: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Shape, Fortran order and dtype from a `.npy` header; CORRUPT if unreadable.

    The stream is left at the first data byte.
    """
    raw = _read_header_bytes(stream)  # exactly the header: the stream is at the data
    try:
        shape, fortran_order, dtype, _ = _parse_npy_header(raw, name)
    except _ShortHeader:
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{name}: expected a .npy header, found {len(raw)} bytes that end inside one",
        ) from None
    return shape, fortran_order, dtype


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


# Readiness (called by the service on every candidate: cheap, never raises).


class Readiness(Enum):
    """What the bytes of an inbox file say about reading it now."""

    COMPLETE = "complete"  # structurally whole: may be read once quiet
    INCOMPLETE = "incomplete"  # may still grow into a whole input: wait
    NEVER = "never"  # no more bytes can make it whole: hand it on to fail
    UNREADABLE = "unreadable"  # cannot be opened or read (permissions, I/O): hand it on
    CHANGED = "changed"  # no longer the regular file that was looked at: look again


def readiness(path: Path) -> Readiness:
    """Whether `path` is structurally whole (the README's "complete").

    `.npy`: the header parses and offset + declared array bytes == file size.
    `.npz`: the zip directory reads and every member's declared (compressed) bytes
    are present. Reads only headers and the zip directory (a large directory only
    its bounds), opens like `open_regular`, and never raises.
    """
    try:
        with open_regular(path) as stream:
            return _stream_readiness(stream, path)
    except (ConversionError, FileNotFoundError, NotADirectoryError):
        return Readiness.CHANGED  # a symlink, a special file or nothing now: look again
    except OSError as error:
        # EINVAL: a seek to a negative offset the bytes declared. Others: the disk.
        return Readiness.NEVER if error.errno == errno.EINVAL else Readiness.UNREADABLE
    except MemoryError:
        return Readiness.UNREADABLE
    # Untrusted bytes: whatever a parser raises means "never whole".
    except Exception:
        return Readiness.NEVER


def _stream_readiness(stream: BinaryIO, path: Path) -> Readiness:
    size = os.fstat(stream.fileno()).st_size
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _npy_readiness(stream, size, path.name)
    if suffix == ".npz":
        return _npz_readiness(stream, size)
    return Readiness.NEVER


def is_complete(path: Path) -> bool:
    """True when `path` is structurally whole (see `readiness`)."""
    return readiness(path) is Readiness.COMPLETE


def _npy_readiness(stream: BinaryIO, size: int, name: str) -> Readiness:
    try:
        shape, _, dtype, offset = _parse_npy_header(stream.read(_NPY_PREFIX_BYTES), name)
        check_dtype(dtype, name)  # pickled objects never add up to a declared size
        check_shape(shape, name)
    except _ShortHeader:
        return Readiness.INCOMPLETE
    except ConversionError:
        return Readiness.NEVER
    expected = offset + math.prod(shape) * dtype.itemsize
    if expected == size:
        return Readiness.COMPLETE
    return Readiness.INCOMPLETE if size < expected else Readiness.NEVER


def _npz_readiness(stream: BinaryIO, size: int) -> Readiness:
    end = _find_zip_end(stream, size)
    if end is None:
        return Readiness.INCOMPLETE  # a zip is written front to back: its end comes last
    directory_bytes, _, end_offset = end
    if directory_bytes > end_offset:
        return Readiness.NEVER
    if directory_bytes > MAX_CHECKED_DIRECTORY_BYTES:
        return Readiness.COMPLETE  # too big to check here: the conversion checks the members
    try:
        with zipfile.ZipFile(stream) as archive:
            return _zip_members_present(archive, stream)
    except (OSError, MemoryError):
        raise
    except Exception:  # its end is written, so its directory never will parse
        return Readiness.NEVER


def _find_zip_end(stream: BinaryIO, size: int) -> tuple[int, int, int] | None:
    """(directory size, directory offset, offset of the end records), None if absent.

    Found as `zipfile` finds it: the last end-of-central-directory signature in
    the file's last 64 KiB, and the zip64 record it points to when it has one.
    """
    tail_start = max(0, size - _ZIP_END_SEARCH_BYTES)
    stream.seek(tail_start)
    tail = stream.read(size - tail_start)
    found = tail.rfind(_ZIP_END_MAGIC)
    if found < 0 or len(tail) - found < _ZIP_END.size:
        return None
    fields = _ZIP_END.unpack_from(tail, found)
    end = (fields[5], fields[6], tail_start + found)
    locator_at = found - _ZIP64_LOCATOR.size
    if locator_at < 0 or tail[locator_at : locator_at + 4] != _ZIP64_LOCATOR_MAGIC:
        return end
    record_at = _ZIP64_LOCATOR.unpack_from(tail, locator_at)[2]
    stream.seek(record_at)
    record = stream.read(_ZIP64_END.size)
    if len(record) < _ZIP64_END.size or record[:4] != _ZIP64_END_MAGIC:
        return end
    fields = _ZIP64_END.unpack(record)
    return fields[-2], fields[-1], record_at


def _zip_members_present(archive: zipfile.ZipFile, stream: BinaryIO) -> Readiness:
    directory_start = _directory_offset(archive, stream)
    for info in archive.infolist():
        if info.header_offset < 0:  # zipfile shifts offsets by the bytes missing before
            return Readiness.NEVER
        stream.seek(info.header_offset)
        local = stream.read(_ZIP_LOCAL_HEADER.size)
        if len(local) < _ZIP_LOCAL_HEADER.size or local[:4] != _ZIP_LOCAL_MAGIC:
            return Readiness.INCOMPLETE
        fields = _ZIP_LOCAL_HEADER.unpack(local)
        name_length, extra_length = fields[-2], fields[-1]
        data_start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length
        if data_start + info.compress_size > directory_start:
            return Readiness.INCOMPLETE
    return Readiness.COMPLETE


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

    Raises ConversionError (TRUNCATED, CORRUPT, UNSAFE_INPUT, UNSUPPORTED_DTYPE,
    BAD_SHAPE, TOO_LARGE, EMPTY_NPZ, NPZ_KEY_MISSING); lets OSError through
    (the file cannot be opened or read: environmental, retried).
    """
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ConversionError(
            ErrorCode.UNSAFE_INPUT, f"{path.name}: expected a .npy or .npz file, found {suffix!r}"
        )
    with open_regular(path) as stream:
        if suffix == ".npy":
            return _open_npy(stream, path, max_input_bytes)
        return _open_npz(stream, path, npz_key, max_input_bytes)


def _open_npy(stream: BinaryIO, path: Path, max_input_bytes: int) -> InputArray:
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


def _open_npz(
    stream: BinaryIO, path: Path, npz_key: str | None, max_input_bytes: int
) -> InputArray:
    size = os.fstat(stream.fileno()).st_size
    try:
        end = _find_zip_end(stream, size)
        if end is not None and end[0] > MAX_DIRECTORY_BYTES:
            raise ConversionError(
                ErrorCode.TOO_LARGE,
                f"{path.name}: expected a zip directory of at most {MAX_DIRECTORY_BYTES} "
                f"bytes, found one of {end[0]} bytes",
            )
        stream.seek(0)
        with zipfile.ZipFile(stream) as archive:
            info = _choose_member(archive, npz_key, path.name)
            label = f"{path.name}[{info.filename.removesuffix('.npy')}]"
            _check_size(info.file_size, max_input_bytes + MAX_HEADER_BYTES, label)
            _check_member_sizes(info, size, label)
            with archive.open(info) as member:
                data = _read_member(member, info.file_size, label, max_input_bytes)
    except (ConversionError, MemoryError):
        raise
    except OSError as error:
        if error.errno != errno.EINVAL:  # EIO and the like: the disk, not the bytes
            raise
        raise ConversionError(
            ErrorCode.CORRUPT, f"{path.name}: expected a zip archive of .npy arrays ({error})"
        ) from None
    # Untrusted bytes: zipfile and zlib raise BadZipFile, NotImplementedError (an
    # unknown zip version or method), RuntimeError (encrypted), EOFError, zlib.error,
    # struct.error, OverflowError, UnicodeDecodeError...
    except Exception as error:  # each of them means "not a valid .npz"
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{path.name}: expected a zip archive of .npy arrays, found unreadable bytes "
            f"({type(error).__name__}: {error})",
        ) from None
    return InputArray(path=path, data=data)


def _check_member_sizes(info: zipfile.ZipInfo, file_size: int, label: str) -> None:
    """Refuse sizes that cannot be true before anything is allocated for them."""
    if info.compress_type == zipfile.ZIP_STORED:
        possible = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        possible = info.compress_size * _DEFLATE_MAX_RATIO + _DEFLATE_SLACK_BYTES
    else:  # numpy only stores or deflates; others have no useful bound on expansion
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{label}: expected a member stored or deflated (as numpy writes them), "
            f"found compression method {info.compress_type}",
        )
    if info.compress_size > file_size:
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{label}: expected at most {file_size} compressed bytes (the file's size), "
            f"found {info.compress_size} declared",
        )
    if info.file_size > possible or (
        info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size
    ):
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{label}: expected at most {possible} bytes from {info.compress_size} "
            f"compressed bytes, found {info.file_size} declared",
        )


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


def _read_member(
    member: IO[bytes], member_size: int, label: str, max_input_bytes: int
) -> npt.NDArray[np.generic]:
    """Read one member after checking its .npy header (size before decompressing)."""
    shape, fortran_order, dtype = _read_npy_header(member, label)
    check_dtype(dtype, label)
    check_shape(shape, label)
    count = math.prod(shape)
    data_bytes = count * dtype.itemsize
    _check_size(data_bytes, max_input_bytes, label)
    held = member_size - member.tell()
    if data_bytes != held:
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{label}: expected {data_bytes} bytes for shape {shape} {dtype.str}, "
            f"found a member holding {held}",
        )
    buffer = bytearray(data_bytes)
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
