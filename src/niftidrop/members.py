"""Streamed `.npz` members: a member's values decompressed as the conversion reads them.

A member's `.npy` header is read from the start of its stream, then its values are
decompressed (deflate, with ISA-L) or copied (stored) into a buffer of the array's
size whose pages exist only once filled. `MemberStream.ensure(view)` fills the
stream up to the last byte `view` reads; `release()` frees the pages filled so far
(the walk never reads them again); a view that starts before what is still held
starts a new pass from the member's first byte. So a layout whose output slabs
come in the member's own order is decompressed once while holding about a slab,
and one that transposes once per group of slabs (`niftidrop.slabs`).

The buffer is a memfd (Linux) whose freed pages are given back at once
(MADV_REMOVE); the array over it is a plain NumPy array, so every layout the
conversion handles works unchanged, provided it `ensure`s what it reads. A member
read whole (`start(whole=True)`, for a preview) is a heap buffer, as `max_memory`
(RLIMIT_DATA) counts heap but not a memfd.

The checks the whole read makes are kept: the stream must end exactly at the
member's declared size, and its CRC-32 must match, else CORRUPT. Both are checked
when a pass reaches the member's end (the last slab of an output), or by
`verify()`; output written before then sits in a temporary file that is removed
with the error, so a member that fails them never has an output committed.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref
import zipfile
from typing import Any, Final

import isal.isal_zlib
import numpy as np
import numpy.typing as npt

from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.npy_header import NPY_PREFIX_BYTES, NpyLayout, ShortHeader, parse_npy_header

# isal's functions carry no annotations.
isal_zlib: Any = isal.isal_zlib

# The local file header: signature, version, flags, method, time, date, CRC,
# sizes, then the lengths of the name and the extra field that come before the data.
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_MAGIC = b"PK\x03\x04"
_ENCRYPTED = 0x1
# Compressed bytes read per call, and decompressed bytes written per step (at most).
READ_BYTES: Final = 1024 * 1024
FILL_BYTES: Final = 4 * 1024 * 1024
_MIN_FILL: Final = 64 * 1024
# What is let go of goes in steps of a memory page (tests take smaller ones).
_HELD_STEP = mmap.PAGESIZE


class _Inflow:
    """A member's decompressed bytes front to back, with their CRC-32 so far."""

    def __init__(self, fd: int, start: int, info: zipfile.ZipInfo, label: str) -> None:
        self._fd, self._start, self._info, self._label = fd, start, info, label
        self.restart()

    def restart(self) -> None:
        """Back to the member's first byte."""
        self._position = self._start
        self._left = self._info.compress_size
        self._tail = b""
        self._inflater = (
            isal_zlib.decompressobj(-15)
            if self._info.compress_type == zipfile.ZIP_DEFLATED
            else None
        )
        self.crc = 0
        self.produced = 0

    def read(self, size: int) -> bytes:
        """At most `size` more bytes, b"" once the stream ends (or can give no more)."""
        if self._inflater is None:
            out = self._compressed(min(size, self._left))
        else:
            out = self._inflate(size)
        self.crc = isal_zlib.crc32(out, self.crc)  # as zlib's, faster
        self.produced += len(out)
        return out

    def _compressed(self, size: int) -> bytes:
        if size <= 0:
            return b""
        data = os.pread(self._fd, size, self._position)
        if not data:
            raise _corrupt(
                self._label, f"found the file ending inside the member ({self._left} bytes early)"
            )
        self._position += len(data)
        self._left -= len(data)
        return data

    def _inflate(self, size: int) -> bytes:
        inflater = self._inflater
        assert inflater is not None
        try:
            while not inflater.eof:
                data = self._tail or self._compressed(min(READ_BYTES, self._left))
                out: bytes = inflater.decompress(data, size)
                self._tail = inflater.unconsumed_tail
                if out:
                    return out
                if not data:  # neither input nor output left: the stream stops short
                    break
        except isal_zlib.error as error:
            raise _corrupt(self._label, f"found damaged deflate data ({error})") from None
        return b""

    def finish(self, total: int) -> None:
        """After `total` bytes: the stream must end there, with the declared CRC-32."""
        if self.read(1):
            raise _corrupt(
                self._label,
                f"found a member that decompresses to more than its declared {total} bytes",
            )
        if self._inflater is not None and not self._inflater.eof:
            raise _corrupt(self._label, "found a deflate stream without its end marker")
        if self.crc != self._info.CRC:
            raise _corrupt(
                self._label,
                f"found a CRC-32 of {self.crc:08x} where the zip directory declares "
                f"{self._info.CRC:08x}",
            )


class MemberStream:
    """One `.npz` member: its `.npy` header, and its values filled on demand.

    `open` reads the header (nothing is allocated yet, so the caller checks what it
    declares); `start` gives the array, whose bytes hold values only where `ensure`d.
    """

    def __init__(self, fd: int, info: zipfile.ZipInfo, data_start: int, label: str) -> None:
        self.label = label
        self._info = info
        self._fd = os.dup(fd)
        weakref.finalize(self, os.close, self._fd)
        self._inflow = _Inflow(self._fd, data_start, info, label)
        self.layout = self._read_layout()
        self.passes = 0  # how many times the values were decompressed from the start
        self.verified = False
        self._buffer: mmap.mmap | bytearray | None = None
        self._address = 0
        self._filled = 0  # values decompressed into the buffer in this pass
        self._wanted = 0  # the end of the last view ensured in this pass
        self._held_from = 0  # values below this were let go (their whole pages freed)
        self._whole = False

    @classmethod
    def open(cls, fd: int, info: zipfile.ZipInfo, label: str) -> MemberStream:
        """The member `info` of the zip open as `fd`, its header read (CORRUPT if damaged)."""
        raw = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
        if len(raw) < _LOCAL_HEADER.size or raw[:4] != _LOCAL_MAGIC:
            raise _corrupt(label, f"found no local header at offset {info.header_offset}")
        fields = _LOCAL_HEADER.unpack(raw)
        if fields[2] & _ENCRYPTED:
            raise _corrupt(label, "found an encrypted member")
        data_start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        if data_start + info.compress_size > os.fstat(fd).st_size:
            raise _corrupt(label, "found a member that runs past the end of the file")
        return cls(fd, info, data_start, label)

    def _read_layout(self) -> NpyLayout:
        wanted = min(NPY_PREFIX_BYTES, self._info.file_size)
        raw = b""
        while len(raw) < wanted and (more := self._inflow.read(wanted - len(raw))):
            raw += more
        try:
            return parse_npy_header(raw, self.label)
        except ShortHeader:
            raise ConversionError(
                ErrorCode.CORRUPT,
                f"{self.label}: expected a .npy header, found {len(raw)} bytes that end inside one",
            ) from None

    @property
    def data_bytes(self) -> int:
        return self.layout.data_bytes

    def start(self, *, whole: bool = False) -> npt.NDArray[np.generic]:
        """The member's array over a buffer filled on demand (see `ensure`), or filled
        at once with `whole` (in the heap: `max_memory` counts it)."""
        self._buffer = bytearray(self.data_bytes) if whole else _new_buffer(self.data_bytes)
        layout = self.layout
        flat = np.frombuffer(
            self._buffer, dtype=layout.dtype, count=self.data_bytes // layout.dtype.itemsize
        )
        self._address = flat.ctypes.data
        self._begin_pass()
        if whole:
            self.load_whole()
        return flat.reshape(layout.shape, order="F" if layout.fortran_order else "C")

    def ensure(self, view: npt.NDArray[Any]) -> None:
        """Make the bytes `view` (a view of this array) reads hold their values."""
        if self._whole or view.size == 0:
            return
        low, high = self._bounds(view)
        if low < self._held_from:
            self._drop(self._filled, restart=True)
            self._begin_pass()
        self._fill(high, keep_from=low)
        self._wanted = max(self._wanted, high)

    def release(self) -> None:
        """Free the pages read so far: the walk reads on from the last view `ensure`d."""
        if not self._whole:
            done = min(self._filled, self._wanted)
            self._drop(done)

    def verify(self) -> None:
        """Read on to the member's end if no pass got there yet (size and CRC checks)."""
        if not self.verified and not self._whole:
            self._fill(self.data_bytes, keep_from=self.data_bytes)

    def load_whole(self) -> None:
        """Fill every value and keep them: the array may then be read in any way."""
        if self._whole:
            return
        if self._held_from > 0:
            self._drop(self._filled, restart=True)
            self._begin_pass()
        self._fill(self.data_bytes, keep_from=0)
        self._whole = True

    def _begin_pass(self) -> None:
        self._inflow.restart()
        self.passes += 1
        self._filled = self._held_from = self._wanted = 0
        header = self.layout.offset
        while header and (skipped := len(self._inflow.read(header))):
            header -= skipped

    def _fill(self, high: int, *, keep_from: int) -> None:
        buffer = self._buffer
        assert buffer is not None, "start() first"
        while self._filled < high:
            # Not much past `high`: what is decompressed is held until released.
            wanted = min(
                FILL_BYTES, max(high - self._filled, _MIN_FILL), self.data_bytes - self._filled
            )
            chunk = self._inflow.read(wanted)
            if not chunk:
                raise _corrupt(
                    self.label,
                    f"expected {self.data_bytes} bytes of values, found {self._filled}",
                )
            buffer[self._filled : self._filled + len(chunk)] = chunk
            self._filled += len(chunk)
            below = min(self._filled, keep_from)
            self._drop(below)  # skipped on the way to `keep_from`
        if self._filled == self.data_bytes and not self.verified:
            self._inflow.finish(self.data_bytes)
            self.verified = True

    def _drop(self, end: int, *, restart: bool = False) -> None:
        """Let go of the values below `end` (all of them, with `restart`), freeing the
        memory pages that lie wholly in what was let go."""
        buffer = self._buffer
        if not isinstance(buffer, mmap.mmap):  # nothing yet, or held whole
            return
        page = mmap.PAGESIZE
        if restart:
            size = min(len(buffer), -(-self._filled // page) * page)
            if size:
                buffer.madvise(_FREE, 0, size)
            self._held_from = 0
            return
        end -= end % _HELD_STEP
        if end <= self._held_from:
            return
        start, stop = -(-self._held_from // page) * page, end - end % page
        if stop > start:
            buffer.madvise(_FREE, start, stop - start)
        self._held_from = end

    def _bounds(self, view: npt.NDArray[Any]) -> tuple[int, int]:
        """The byte range [low, high) of the buffer that `view` reads."""
        low = high = view.ctypes.data - self._address
        for length, stride in zip(view.shape, view.strides, strict=True):
            if stride < 0:
                low += (length - 1) * stride
            else:
                high += (length - 1) * stride
        high += view.itemsize
        if low < 0 or high > self.data_bytes:
            raise ValueError(f"{self.label}: a view outside the member's values")
        return low, high


# Freed pages read back as zeros: MADV_REMOVE gives a memfd's pages back at once,
# MADV_DONTNEED those of a private anonymous mapping.
_FREE = mmap.MADV_REMOVE if hasattr(os, "memfd_create") else mmap.MADV_DONTNEED


def _new_buffer(size: int) -> mmap.mmap:
    """A zero-filled buffer of `size` bytes whose pages exist only once written.

    A memfd rather than a private anonymous mapping: `max_memory` (RLIMIT_DATA)
    counts a private mapping's whole size, not what it holds.
    """
    if not hasattr(os, "memfd_create"):
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fd = os.memfd_create("niftidrop-member", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _corrupt(label: str, found: str) -> ConversionError:
    return ConversionError(ErrorCode.CORRUPT, f"{label}: expected a valid .npy member, {found}")
