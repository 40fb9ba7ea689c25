"""Loading and validating input arrays (`.npy`, `.npz`) without trusting them.

Everything that reads a file from the inbox opens it here: the readiness check
(`niftidrop.completeness`: cheap, never raises) and the conversion (`open_input`).
Both open files the same way (`open_regular`: never following a symlink, never
blocking on a FIFO, regular files only) and both read `.npy` headers with one
reader (`niftidrop.npy_header`), so no header can be harmless to one and fatal
to the other.

`.npy` files are never read whole: their header is parsed (directly when it is
exactly as numpy writes it, else with `numpy.lib.format`) and the data is
memory-mapped, so the conversion can stream it slab by slab and drop the pages it
has used. `.npz` members are checked against `max_input_bytes`, against what
their compressed size makes possible and against their `.npy` header before
anything is allocated, then streamed (`niftidrop.members`): decompressed as the
conversion reads them, slab by slab, or whole when asked. Nothing here ever unpickles
(`allow_pickle=False` semantics): object dtypes are rejected from the header,
before any data is read.

The bytes are untrusted: whatever a library raises while parsing them (numpy's
header reader, `zipfile`, `zlib`) is an input error, `corrupt`, never a crash.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt

from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.members import MemberStream
from niftidrop.npy_header import MAX_HEADER_BYTES, check_dtype, check_shape, read_npy_layout

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


class InputArray:
    """A validated input: the array (mapped, streamed or in memory) and where it came from.

    `mapping` is the read-only memory map behind the array for `.npy` inputs;
    `stream` the decompressing reader behind a streamed `.npz` member. `data` is
    the array, readable in any way (a streamed member is then decompressed whole);
    `lazy` is the same array for readers that walk it in slabs: they `ensure` each
    view before reading it. `release_pages()` frees what was read so far, so that
    streaming a large file keeps the process small.
    """

    def __init__(
        self,
        path: Path,
        data: npt.NDArray[np.generic],
        mapping: mmap.mmap | None = None,
        stream: MemberStream | None = None,
    ) -> None:
        self.path = path
        self.lazy = data
        self.mapping = mapping
        self.stream = stream

    def __repr__(self) -> str:
        kind = "mapped" if self.mapping else "streamed" if self.stream else "in memory"
        return f"<InputArray {self.path.name} {self.shape} {self.dtype.str} {kind}>"

    @property
    def data(self) -> npt.NDArray[np.generic]:
        """The whole array (a streamed member is read whole, and kept, first)."""
        if self.stream is not None:
            self.stream.load_whole()
        return self.lazy

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.lazy.shape)

    @property
    def dtype(self) -> np.dtype[np.generic]:
        return self.lazy.dtype

    @property
    def paged(self) -> bool:
        """True when its values are read from a file as they are needed (mapped, streamed)."""
        return self.mapping is not None or self.stream is not None

    def ensure(self, view: npt.NDArray[Any]) -> None:
        """Make the values that `view` (a view of `lazy`) reads present."""
        if self.stream is not None:
            self.stream.ensure(view)

    def release_pages(self) -> None:
        """Tell the kernel we no longer need the pages read so far."""
        if self.mapping is not None:
            self.mapping.madvise(mmap.MADV_DONTNEED)
        if self.stream is not None:
            self.stream.release()

    def verify(self) -> None:
        """Finish the checks that need the whole input read (a member's size and CRC)."""
        if self.stream is not None:
            self.stream.verify()


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


def open_regular(path: Path, *, buffering: int = -1) -> BinaryIO:
    """`path` open for reading, if it is a regular file (UNSAFE_INPUT otherwise).

    A plain `open` follows a symlink swapped in after the caller's `lstat` and
    blocks forever on a FIFO; this opens without following or blocking and checks
    what it opened. Other OSErrors (EACCES, ENOENT, EIO) are let through.
    `buffering` as for `open`: 0 for a few large reads, each one system call.
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
                return os.fdopen(fd, "rb", buffering=buffering)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        kind = file_kind(mode)
    raise ConversionError(
        ErrorCode.UNSAFE_INPUT,
        f"{path.name}: expected a regular file, found a {kind}; it is not followed",
    )


# Reading the end of a zip.


def find_zip_end(stream: BinaryIO, size: int) -> tuple[int, int, int] | None:
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


# Opening inputs.


def open_input(
    path: Path, *, npz_key: str | None, max_input_bytes: int, streamed: bool = True
) -> InputArray:
    """The validated array of `path`: `.npy` memory-mapped, `.npz` member streamed
    (decompressed as it is read; with `streamed=False`, whole at once).

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
        return _open_npz(stream, path, npz_key, max_input_bytes, whole=not streamed)


def _open_npy(stream: BinaryIO, path: Path, max_input_bytes: int) -> InputArray:
    layout = read_npy_layout(stream, path.name)
    check_shape(layout.shape, path.name)
    _check_size(layout.data_bytes, max_input_bytes, path.name)
    expected = layout.file_bytes
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
    stream: BinaryIO, path: Path, npz_key: str | None, max_input_bytes: int, *, whole: bool
) -> InputArray:
    size = os.fstat(stream.fileno()).st_size
    try:
        end = find_zip_end(stream, size)
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
            archive.open(info).close()  # zipfile's checks of the local header
            member = _open_member(stream, info, label, max_input_bytes)
            data = member.start(whole=whole)
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
    return InputArray(path=path, data=data, stream=member)


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


def _open_member(
    stream: BinaryIO, info: zipfile.ZipInfo, label: str, max_input_bytes: int
) -> MemberStream:
    """The member's stream after checking its .npy header (sizes before decompressing)."""
    member = MemberStream.open(stream.fileno(), info, label)
    layout = member.layout
    check_dtype(layout.dtype, label)
    check_shape(layout.shape, label)
    _check_size(layout.data_bytes, max_input_bytes, label)
    held = info.file_size - layout.offset
    if layout.data_bytes != held:
        raise ConversionError(
            ErrorCode.CORRUPT,
            f"{label}: expected {layout.data_bytes} bytes for shape {layout.shape} "
            f"{layout.dtype.str}, found a member holding {held}",
        )
    return member


def _check_size(declared: int, limit: int, name: str) -> None:
    if declared > limit:
        raise ConversionError(
            ErrorCode.TOO_LARGE,
            f"{name}: expected at most {limit} bytes (max_input_bytes), "
            f"found an array of {declared} bytes",
        )
