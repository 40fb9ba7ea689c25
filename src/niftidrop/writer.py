"""Atomic, durable output files with fast multi-threaded gzip (SPEC §1.3, §3).

A file is written under a hidden temporary name in its target folder
(`.<name>.<random>.tmp`), flushed and fsync'ed, then renamed to its final name and
the folder fsync'ed, so a reader of the folder sees the whole file or nothing.
Compression uses ISA-L's igzip, threaded for large outputs: a standard gzip
stream, with a fixed header (no name, mtime 0) so the same input always gives the
same bytes. Small outputs are compressed on the calling thread: starting a pool
of compression threads costs more than it saves on them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Literal

import isal.igzip
import isal.igzip_threaded

from niftidrop.errors import ConversionError, ErrorCode

# isal's functions carry no annotations.
igzip: Any = isal.igzip
igzip_threaded: Any = isal.igzip_threaded
Chunk = bytes | memoryview
TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
# igzip compresses blocks of this size on each thread (each primed with the 32 KiB
# before it); small blocks keep the queues, and so the memory, small.
GZIP_BLOCK_BYTES = 256 * 1024
# Below this many uncompressed bytes one thread compresses faster than a pool.
THREADED_GZIP_MIN_BYTES = 4 * 1024 * 1024
OnConflict = Literal["overwrite", "rename", "fail"]
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def temp_path_for(final: Path) -> Path:
    """A fresh hidden temporary name next to `final`."""
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """True for names `temp_path_for` makes (stale ones are safe to delete)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def fsync_folder(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_temp(
    final: Path,
    chunks: Iterable[Chunk],
    *,
    compress: bool,
    level: int = 1,
    threads: int = 1,
    fsync: bool = True,
    size: int | None = None,
) -> Path:
    """Write `chunks` (gzip-compressed if `compress`) to a temporary file next to `final`.

    `size` is the total of `chunks` when known: below THREADED_GZIP_MIN_BYTES
    it is compressed on this thread whatever `threads` says (the bytes depend
    only on the data). Returns the temporary path; on any exception the temporary
    file is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(final)
    try:
        with temp.open("xb") as raw:
            if compress:
                with _gzip_writer(raw, level, threads, size) as gz:
                    for chunk in chunks:
                        gz.write(chunk)
            else:
                for chunk in chunks:
                    raw.write(chunk)
            raw.flush()
            if fsync:
                os.fsync(raw.fileno())
    except BaseException:
        discard(temp)
        raise
    return temp


def _gzip_writer(raw: IO[bytes], level: int, threads: int, size: int | None) -> Any:
    if size is not None and size < THREADED_GZIP_MIN_BYTES:
        # An empty name and mtime 0: the header does not depend on the file or the time.
        return igzip.IGzipFile(filename="", mode="wb", compresslevel=level, fileobj=raw, mtime=0)
    return igzip_threaded.open(
        raw, "wb", compresslevel=level, threads=threads, block_size=GZIP_BLOCK_BYTES
    )


def discard(temp: Path) -> None:
    """Remove a temporary file, if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()


def unique_name(final: Path, number: int) -> Path:
    """`final` with `-<number>` before its extension (`a.nii.gz` -> `a-2.nii.gz`)."""
    name = final.name
    stem, dot, extension = name.partition(".")
    if not stem:  # a name starting with a dot has no stem before its first dot
        stem, dot, extension = name, "", ""
    return final.with_name(f"{stem}-{number}{dot}{extension}")


def commit(temp: Path, final: Path, *, on_conflict: OnConflict, fsync: bool = True) -> Path:
    """Give `temp` its final name; returns the name used.

    `overwrite` replaces atomically; `rename` takes the first free `unique_name`;
    `fail` raises ConversionError OUTPUT_CONFLICT when `final` exists. Never
    replaces an existing file except with `overwrite`.
    """
    try:
        if on_conflict == "overwrite":
            temp.replace(final)
            placed = final
        else:
            placed = _place_new(temp, final, on_conflict)
    except BaseException:
        discard(temp)
        raise
    if fsync:
        fsync_folder(final.parent)
    return placed


def _place_new(temp: Path, final: Path, on_conflict: OnConflict) -> Path:
    number = 0
    while True:
        candidate = final if number == 0 else unique_name(final, number)
        if _link_exclusive(temp, candidate):
            discard(temp)
            return candidate
        if on_conflict == "fail":
            raise ConversionError(
                ErrorCode.OUTPUT_CONFLICT,
                f"{final}: expected no file under this name (on_conflict = fail), found one",
            )
        number += 1


def _link_exclusive(temp: Path, candidate: Path) -> bool:
    """Give `temp` the name `candidate` unless that name exists (race free with links)."""
    try:
        os.link(temp, candidate)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # File systems without hard links: check, then rename (a small race remains).
        if candidate.exists():
            return False
        temp.rename(candidate)
    return True


def write_file(
    final: Path,
    chunks: Iterable[Chunk],
    *,
    compress: bool,
    on_conflict: OnConflict = "overwrite",
    level: int = 1,
    threads: int = 1,
    fsync: bool = True,
    size: int | None = None,
) -> Path:
    """Write `chunks` to `final` atomically; returns the final name used."""
    temp = write_temp(
        final, chunks, compress=compress, level=level, threads=threads, fsync=fsync, size=size
    )
    return commit(temp, final, on_conflict=on_conflict, fsync=fsync)
