"""Atomic, durable output files with fast multi-threaded gzip (README: File protocol, Conversion).

A file is written under a hidden temporary name in its target folder, flushed
and fsync'ed, then renamed to its final name and the folder fsync'ed, so a reader
of the folder sees the whole file or nothing. Folders it creates are fsync'ed in
their parent too: after a power cut a new folder, and every file in it, could
otherwise vanish although each file was fsync'ed.

Temporary names are `.<name>.<owner>.<random>.tmp`. The owner part says whose
the file is, so that a service sharing outbox, archive or failed with others
removes only its own leftovers (`is_owned_by`); files written without an owner
(the CLI, the Python API) are `.<name>.<random>.tmp`.

Compression uses ISA-L's igzip, threaded for large outputs: a standard gzip
stream, with a fixed header (no name, mtime 0) so the same input always gives the
same bytes. Small outputs are compressed on the calling thread: starting a pool
of compression threads costs more than it saves on them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

import isal.igzip
import isal.igzip_threaded

from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.steps import step

# isal's functions carry no annotations.
igzip: Any = isal.igzip
igzip_threaded: Any = isal.igzip_threaded
Chunk = bytes | memoryview
TEMP_PREFIX: Final = "."
TEMP_SUFFIX: Final = ".tmp"
# Characters a temporary name adds to the final name at most, for an owner of up
# to OWNER_MAX_CHARS: the dot before the name, the owner's and the random part's
# dots, 12 random hex digits and the suffix.
OWNER_MAX_CHARS: Final = 24
TEMP_EXTRA_CHARS: Final = len(TEMP_PREFIX) + 1 + OWNER_MAX_CHARS + 1 + 12 + len(TEMP_SUFFIX)
# igzip compresses blocks of this size on each thread (each primed with the 32 KiB
# before it); small blocks keep the queues, and so the memory, small.
GZIP_BLOCK_BYTES = 256 * 1024
# Below this many uncompressed bytes one thread compresses faster than a pool.
THREADED_GZIP_MIN_BYTES = 4 * 1024 * 1024
OnConflict = Literal["overwrite", "rename", "fail"]
# Errors of link() that mean "no hard link here" rather than a failure.
NO_HARD_LINKS: Final = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}
)


@dataclass(frozen=True)
class Temporary:
    """A file written under its temporary name; `size` and `inode` were taken from its
    descriptor, so nothing needs the file once it is committed (a consumer may move
    an output away the moment it appears)."""

    path: Path
    size: int
    inode: tuple[int, int]  # (st_dev, st_ino)


def temp_path_for(final: Path, owner: str = "") -> Path:
    """A fresh hidden temporary name next to `final`, tagged with `owner` if given."""
    if owner and ("." in owner or "/" in owner or len(owner) > OWNER_MAX_CHARS):
        raise ValueError(f"owner: expected at most {OWNER_MAX_CHARS} characters, no dot or /")
    tag = f"{owner}." if owner else ""
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{tag}{secrets.token_hex(6)}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """True for names `temp_path_for` makes (and producers' hidden `.tmp` files)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def is_owned_by(name: str, owner: str) -> bool:
    """Whether `name` is a temporary name `temp_path_for` made for `owner` or for a part
    of it (`<owner>-<part>`): the one rule for what a service may tidy away."""
    if not owner or not is_temp_name(name):
        return False
    parts = name[len(TEMP_PREFIX) : -len(TEMP_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3 or not parts[0]:
        return False
    tag = parts[1]
    return tag == owner or tag.startswith(owner + "-")


def fsync_folder(folder: Path) -> None:
    """Make a rename, link, unlink or mkdir in `folder` durable."""
    step("folder_fsync")
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_folders(folder: Path, *, fsync: bool = True) -> None:
    """Create `folder` and its missing parents, each made durable in its parent."""
    if folder.is_dir():
        return
    missing = []
    current = folder
    while not os.path.lexists(current):  # a file in the way: mkdir says so below
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for new in reversed(missing):
        step("folder_create")
        # Created by another thread meanwhile: fsync'ed all the same, since this
        # thread's file may be durable before the other thread's fsync.
        new.mkdir(exist_ok=True)
        if fsync:
            fsync_folder(new.parent)


def write_temp(
    final: Path,
    chunks: Iterable[Chunk],
    *,
    compress: bool,
    level: int = 1,
    threads: int = 1,
    fsync: bool = True,
    size: int | None = None,
    owner: str = "",
    kind: str = "output",
    make_parents: bool = True,
) -> Temporary:
    """Write `chunks` (gzip-compressed if `compress`) to a temporary file next to `final`.

    `size` is the total of `chunks` when known: below THREADED_GZIP_MIN_BYTES
    it is compressed on this thread whatever `threads` says (the bytes depend
    only on the data). `owner` tags the temporary name; `kind` names the steps
    (`<kind>_create`, `_write`, `_fsync`). On any exception the temporary file
    is removed.
    """
    if make_parents:
        make_folders(final.parent, fsync=fsync)
    temp = temp_path_for(final, owner)
    step(f"{kind}_create")
    try:
        with temp.open("xb") as raw:
            step(f"{kind}_write")
            if compress:
                with _gzip_writer(raw, level, threads, size) as gz:
                    for chunk in chunks:
                        gz.write(chunk)
            else:
                for chunk in chunks:
                    raw.write(chunk)
            raw.flush()
            if fsync:
                step(f"{kind}_fsync")
                os.fsync(raw.fileno())
            info = os.fstat(raw.fileno())
    except BaseException:
        discard(temp)
        raise
    return Temporary(temp, info.st_size, (info.st_dev, info.st_ino))


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


def commit(
    temp: Temporary,
    final: Path,
    *,
    on_conflict: OnConflict,
    fsync: bool = True,
    kind: str = "output",
) -> Path:
    """Give `temp` its final name; returns the name used.

    `overwrite` replaces atomically; `rename` takes the first free `unique_name`;
    `fail` raises ConversionError OUTPUT_CONFLICT when `final` exists. Never
    replaces an existing file except with `overwrite`. Once the name is given,
    nothing here touches the final file again.
    """
    try:
        step(f"{kind}_commit")
        if on_conflict == "overwrite":
            temp.path.replace(final)
            placed = final
        else:
            placed = _place_new(temp.path, final, on_conflict)
    except BaseException:
        discard(temp.path)
        raise
    if fsync:
        fsync_folder(final.parent)
    return placed


def withdraw(placed: Path, temp: Temporary) -> None:
    """Remove the file `commit` placed at `placed`, if that name still holds it."""
    try:
        info = placed.lstat()
    except FileNotFoundError:
        return  # taken away already (by a consumer of the outbox)
    if (info.st_dev, info.st_ino) == temp.inode:
        discard(placed)


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
        if exc.errno not in NO_HARD_LINKS:
            raise
        # File systems without hard links: check, then rename (a small race remains).
        if os.path.lexists(candidate):
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
    owner: str = "",
    kind: str = "output",
    make_parents: bool = True,
) -> Path:
    """Write `chunks` to `final` atomically; returns the final name used."""
    temp = write_temp(
        final,
        chunks,
        compress=compress,
        level=level,
        threads=threads,
        fsync=fsync,
        size=size,
        owner=owner,
        kind=kind,
        make_parents=make_parents,
    )
    return commit(temp, final, on_conflict=on_conflict, fsync=fsync, kind=kind)


def write_json_atomic(
    path: Path, data: Mapping[str, Any], *, durable: bool, owner: str = "", kind: str
) -> None:
    """Replace `path` with `data` as JSON, atomically: readers see the old or the new
    whole file, and a failure at any step leaves no temporary file behind."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    write_file(
        path,
        [text.encode()],
        compress=False,
        fsync=durable,
        owner=owner,
        kind=kind,
        make_parents=False,
    )
