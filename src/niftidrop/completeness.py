"""Whether an inbox file is structurally whole (the README's "complete").

Called by the service on every candidate, on its main thread: cheap (headers and
zip directories only), and it never raises. It opens files as the conversion does
(`arrays.open_regular`) and reads `.npy` headers with the conversion's reader
(`niftidrop.npy_header`), so no header can be harmless to one and fatal to the
other.
"""

from __future__ import annotations

import errno
import os
import struct
import zipfile
from enum import Enum
from pathlib import Path
from typing import IO, BinaryIO, Final

from niftidrop.arrays import find_zip_end, open_regular
from niftidrop.errors import ConversionError
from niftidrop.npy_header import (
    NPY_PREFIX_BYTES,
    ShortHeader,
    check_dtype,
    check_shape,
    parse_npy_header,
)

_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"
# The readiness check runs on the service's main thread: it parses a zip directory
# only up to this size (about 1,400 members); past it, it checks that the directory
# is in the file and leaves the members to the conversion. A 500,000-member
# directory takes seconds to parse.
MAX_CHECKED_DIRECTORY_BYTES: Final = 64 * 1024


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
        # A `.npy` header is one read, unbuffered (a buffered file also asks whether
        # it is a terminal, and where it is); a zip's reads, which a file system may
        # cut short, stay buffered (a buffered read loops until it has them all).
        buffering = 0 if path.suffix.lower() == ".npy" else -1
        with open_regular(path, buffering=buffering) as stream:
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
        layout = parse_npy_header(stream.read(NPY_PREFIX_BYTES), name)
        check_dtype(layout.dtype, name)  # pickled objects never add up to a declared size
        check_shape(layout.shape, name)
    except ShortHeader:
        return Readiness.INCOMPLETE
    except ConversionError:
        return Readiness.NEVER
    expected = layout.file_bytes
    if expected == size:
        return Readiness.COMPLETE
    return Readiness.INCOMPLETE if size < expected else Readiness.NEVER


def _npz_readiness(stream: BinaryIO, size: int) -> Readiness:
    end = find_zip_end(stream, size)
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
