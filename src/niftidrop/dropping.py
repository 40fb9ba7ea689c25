"""Writing an input into the inbox for the service (README: File protocol for producers).

`drop(data, inbox, name)` is what a producer calls instead of writing the file
itself: the array (`.npy`) or the mapping of arrays (`.npz`) is written under a
hidden temporary name in its target folder, fsync'ed, renamed to `name` and the
folder fsync'ed (`niftidrop.writer`, the service's own atomic write), so the
service never sees it partial and it survives a power cut once `drop` returns.
It is a plain file write: no service needs to run, and nothing is configured.

A name the service would never take (`names.inbox_path_problem`: hidden, a
temporary or partial-download ending, outside the inbox...) is refused before
anything is written, as is data that the name's extension does not describe or
that the service would refuse from its header (pickled objects, strings).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from niftidrop.names import inbox_path_problem, known_suffix
from niftidrop.writer import commit, write_temp

# What `drop` takes as a path: a `str` or any path-like object (`Path`).
StrPath = str | os.PathLike[str]
# Array dtypes the service converts (README: Conversion): numbers and booleans.
_NUMERIC_KINDS = "biufc"


def drop(
    data: npt.ArrayLike | Mapping[str, npt.ArrayLike],
    inbox: StrPath,
    name: StrPath,
    *,
    compressed: bool = False,
) -> Path:
    """Write `data` into `inbox` as `name` atomically and durably; returns its path.

    `data` is an array (anything `numpy.asarray` takes: a CPU tensor too), written
    as a `.npy`, or a mapping of member names to arrays, written as a `.npz` with
    its first entry first (the member the service converts unless `npz_key` names
    another; `compressed` deflates the members). `name` is relative to `inbox` and
    may name subfolders, which are created. An existing file of that name is
    replaced, atomically. Raises ValueError, before anything is written, for a name
    the service would ignore, an extension that does not fit the data, or data the
    service would refuse from its header; OSError for the file system's errors
    (nothing is left under the final name, and the temporary file is removed).
    """
    relative = PurePosixPath(os.fspath(name))
    problem = inbox_path_problem(relative)
    if problem is not None:
        raise ValueError(f"{relative}: expected {problem}: the service would never read it")
    if isinstance(data, Mapping):
        arrays = {
            str(key): _numeric(value, f"{relative}, member {key!r}") for key, value in data.items()
        }
        if not arrays:
            raise ValueError(f"{relative}: expected at least one array in the mapping, found none")
        write = _npz_writer(arrays, compressed)
        extension = ".npz"
    else:
        array = _numeric(data, str(relative))
        write = _npy_writer(array)
        extension = ".npy"
    if not known_suffix(relative.name, (extension,)):
        found = "a mapping" if extension == ".npz" else "an array"
        raise ValueError(f"{relative}: expected a name ending in {extension} for {found}")
    final = Path(inbox) / relative
    temp = write_temp(final, write, compress=False, fsync=True, kind="drop")
    return commit(temp, final, on_conflict="overwrite", fsync=True, kind="drop")


def _numeric(value: npt.ArrayLike, what: str) -> npt.NDArray[Any]:
    """`value` as an array of numbers or booleans, or a ValueError saying what it is."""
    array = np.asarray(value)
    if array.dtype.kind not in _NUMERIC_KINDS or array.dtype.fields is not None:
        raise ValueError(
            f"{what}: expected numbers or booleans (the service converts nothing else), "
            f"found dtype {array.dtype}"
        )
    return array


def _npy_writer(array: npt.NDArray[Any]) -> Any:
    def write(file: IO[bytes]) -> None:
        np.save(file, array, allow_pickle=False)

    return write


def _npz_writer(arrays: dict[str, npt.NDArray[Any]], compressed: bool) -> Any:
    # As `np.savez` writes it, but any key may name a member ("file" too), and no
    # member is pickled.
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED

    def write(file: IO[bytes]) -> None:
        with zipfile.ZipFile(file, "w", compression=method, allowZip64=True) as archive:
            for key, array in arrays.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    return write
