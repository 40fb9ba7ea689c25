"""Atomic, durable output files with fast multi-threaded gzip (README: File protocol, Conversion).

A file is written under a hidden temporary name in its target folder, flushed
and fsync'ed, then renamed to its final name and the folder fsync'ed, so a reader
of the folder sees the whole file or nothing. Folders it creates are fsync'ed in
their parent too: after a power cut a new folder, and every file in it, could
otherwise vanish although each file was fsync'ed.

Temporary names are `.<name>.<owner>.<random>.tmp`. The owner part says whose
the file is, so that a service sharing outbox, archive or failed with others
removes only its own leftovers (`niftidrop.names.is_owned_by`, where that rule
lives); files written without an owner (the CLI, the Python API) are
`.<name>.<random>.tmp`.

A name is never taken from another file except with `on_conflict = "overwrite"`:
names are given by `link()`, which refuses an existing one (`link_exclusive`,
`link_unique`, with a unique suffix from `niftidrop.names`); where links are
refused (`NO_HARD_LINKS`) a rename after a check, or a copy, stands in.

Compression uses ISA-L's igzip in blocks (`niftidrop.gzip_blocks`), threaded for
large outputs: a standard gzip stream whose bytes depend only on the data and the
level (a fixed header, no name, mtime 0), so the same input always gives the same
bytes. Small outputs are compressed on the calling thread: starting a pool of
compression threads costs more than it saves on them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal, TypedDict, Unpack, cast

from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.fs_probe import make_folder
from niftidrop.gzip_blocks import GzipBlockWriter
from niftidrop.names import temp_path_for, unique_name, unique_names
from niftidrop.steps import step

Chunk = bytes | memoryview
# What a file is written from: its chunks, or a function that writes it to a file
# object (`np.save`, which streams an array of any layout without a copy). When
# compressed, a chunk must stay valid until the chunk after the next one is asked
# for (`GzipBlockWriter.write_chunks`); a function's writes are copied.
Content = Iterable[Chunk] | Callable[[IO[bytes]], object]
# Below this many uncompressed bytes one thread compresses faster than a pool.
THREADED_GZIP_MIN_BYTES = 4 * 1024 * 1024
OnConflict = Literal["overwrite", "rename", "fail"]
COPY_CHUNK_BYTES: Final = 1 << 20
# A written file's buffer. Given a size, `open` does not ask whether the file is a
# terminal (a system call, and a turn of the interpreter lock, per file written).
WRITE_BUFFER_BYTES: Final = 64 * 1024
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
        make_folder(new)
        if fsync:
            fsync_folder(new.parent)


def write_temp(
    final: Path,
    chunks: Content,
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
    """Write `chunks` (gzip-compressed if `compress`) to a temporary file next to `final`;
    `chunks` may also be a function that writes to the file object it is given.

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
        with temp.open("xb", buffering=WRITE_BUFFER_BYTES) as raw:
            step(f"{kind}_write")
            if compress:
                one_thread = size is not None and size < THREADED_GZIP_MIN_BYTES
                with GzipBlockWriter(raw, level=level, threads=1 if one_thread else threads) as gz:
                    if callable(chunks):
                        chunks(cast(IO[bytes], gz))
                    else:
                        gz.write_chunks(chunks)
            else:
                _fill(raw, chunks)
            raw.flush()
            if fsync:
                step(f"{kind}_fsync")
                os.fsync(raw.fileno())
            info = os.fstat(raw.fileno())
    except BaseException:
        discard(temp)
        raise
    return Temporary(temp, info.st_size, (info.st_dev, info.st_ino))


def _fill(file: IO[bytes], chunks: Content) -> None:
    """Write `chunks` to `file`, or let `chunks` write itself there."""
    if callable(chunks):
        chunks(file)
        return
    for chunk in chunks:
        file.write(chunk)


def discard(temp: Path) -> None:
    """Remove a temporary file, if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()


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
        if link_exclusive(temp, candidate):
            discard(temp)
            return candidate
        if on_conflict == "fail":
            raise output_conflict(final)
        number += 1


def check_free(finals: Iterable[Path], input_name: str = "") -> None:
    """OUTPUT_CONFLICT unless every name in `finals` is free (on_conflict = fail)."""
    for final in finals:
        if os.path.lexists(final):
            raise output_conflict(final, input_name)


def output_conflict(final: Path, input_name: str = "") -> ConversionError:
    """The OUTPUT_CONFLICT of `on_conflict = fail` at `final`, naming the input whose
    output it is when given."""
    if input_name:
        found = f"{input_name}: expected no file at output {final}"
    else:
        found = f"{final}: expected no file under this name"
    return ConversionError(ErrorCode.OUTPUT_CONFLICT, f"{found} (on_conflict = fail), found one")


def link_exclusive(temp: Path, candidate: Path) -> bool:
    """Give `temp` the name `candidate` unless that name exists (race free with links);
    on file systems without hard links `temp` is renamed instead. False if it exists."""
    try:
        os.link(temp, candidate, follow_symlinks=False)
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


def link_unique(source: Path, folder: Path, *, name: str = "", fsync: bool = True) -> Path:
    """Give `source` a new name in `folder` (`name` or a suffixed variant) that no
    file has; where links are refused, a copy of it gets that name."""
    make_folders(folder, fsync=fsync)
    linked = source
    copy: Path | None = None
    try:
        for candidate in unique_names(name or source.name):
            target = folder / candidate
            try:
                os.link(linked, target, follow_symlinks=False)
            except FileExistsError:
                continue
            except OSError as error:
                if copy is not None or error.errno not in NO_HARD_LINKS:
                    raise
                copy = temp_path_for(target)
                copy_file(source, copy, fsync=fsync)
                linked = copy
                if not link_exclusive(copy, target):
                    continue
            if fsync:
                fsync_folder(folder)
            return target
        raise AssertionError("unreachable: unique_names never ends")
    finally:
        if copy is not None:
            discard(copy)


def copy_file(source: Path, copy: Path, *, fsync: bool) -> list[int]:
    """Copy `source` (a file, or a symlink: not followed) to the new name `copy` with
    its mode and times; returns the copy's [st_dev, st_ino]. Nothing is left of the
    copy if any step fails."""
    step("copy_create")
    try:
        if source.is_symlink():
            copy.symlink_to(source.readlink())
        else:
            with source.open("rb") as original, copy.open("xb") as duplicate:
                step("copy_write")
                shutil.copyfileobj(original, duplicate, COPY_CHUNK_BYTES)
                duplicate.flush()
                shutil.copystat(source, copy)
                if fsync:
                    step("copy_fsync")
                    os.fsync(duplicate.fileno())
        info = copy.lstat()
    except BaseException:
        discard(copy)
        raise
    return [info.st_dev, info.st_ino]


class WriteOptions(TypedDict, total=False):
    """The keyword arguments of `write_temp` that `write_file` passes on (same defaults)."""

    level: int
    threads: int
    fsync: bool
    size: int | None
    owner: str
    kind: str
    make_parents: bool


def write_file(
    final: Path,
    chunks: Content,
    *,
    compress: bool,
    on_conflict: OnConflict = "overwrite",
    **options: Unpack[WriteOptions],
) -> Path:
    """Write `chunks` to `final` atomically (`write_temp`, then `commit`); returns the
    final name used."""
    temp = write_temp(final, chunks, compress=compress, **options)
    fsync, kind = options.get("fsync", True), options.get("kind", "output")
    return commit(temp, final, on_conflict=on_conflict, fsync=fsync, kind=kind)


def write_json_atomic(
    path: Path,
    data: Mapping[str, Any],
    *,
    durable: bool,
    owner: str = "",
    kind: str,
    indent: int | None = None,
) -> None:
    """Replace `path` with `data` as JSON, atomically: readers see the old or the new
    whole file, and a failure at any step leaves no temporary file behind.

    `indent` for files people read: JSON with it is made by Python code, about
    three times slower than the C encoder's compact JSON (40 against 12 µs for a
    move record).
    """
    text = json.dumps(data, indent=indent, default=str) + "\n"
    write_file(
        path,
        [text.encode()],
        compress=False,
        fsync=durable,
        owner=owner,
        kind=kind,
        make_parents=False,
    )
