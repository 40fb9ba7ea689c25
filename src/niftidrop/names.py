"""Whether an input's name can be carried through the spool (README: "Names").

An input keeps its name and its relative path everywhere it goes: the claim folder,
the outbox (`<stem>.nii.gz`, `<stem>_c<N>.nii.gz`, `<stem>.json`, each first written
under a temporary name), archive and failed (perhaps with a `-N` unique suffix,
and `<name>.error.json` beside it in failed). Each of those names must fit the
name limit of its folder's file system (`NAME_MAX`, usually 255 bytes) and each
path the system's path limit (`PATH_MAX`, 4096 bytes). An input whose name or
path cannot be carried fails as `bad_name`: that is decided when it is claimed,
before anything is written, so a name that is too long is never retried.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from niftidrop.writer import OWNER_MAX_CHARS, temp_path_for

DEFAULT_NAME_MAX: Final = 255
DEFAULT_PATH_MAX: Final = 4096
# Room kept for a unique suffix (`-1` ... `-9999`): archive and failed never
# overwrite, so a taken name gets one.
UNIQUE_ROOM: Final = "-9999"
# Room kept for a channel suffix with `channels = "split"` (`_c0` ... `_c9999`).
CHANNEL_ROOM: Final = "_c9999"
# Relative paths deeper than this are not mirrored: folder walks of outbox,
# archive and failed must stay well inside Python's recursion limit.
MAX_DEPTH: Final = 256
# A shortened name keeps at least this many bytes of its stem.
_SHORTEST_STEM: Final = 8


def byte_length(name: str | Path | PurePosixPath) -> int:
    """The length of `name` as the file system sees it (bytes, not characters)."""
    return len(os.fsencode(name))


def temporary_name(name: str) -> str:
    """The longest hidden temporary name niftidrop writes before `name` exists."""
    return temp_path_for(Path(name), owner="x" * OWNER_MAX_CHARS).name


@dataclass(frozen=True)
class Limits:
    """The name and path limits of one folder's file system."""

    name_max: int = DEFAULT_NAME_MAX
    path_max: int = DEFAULT_PATH_MAX

    @classmethod
    def of(cls, folder: Path) -> Limits:
        """The limits where `folder` is (or would be: its nearest existing parent)."""
        for candidate in (folder, *folder.parents):
            with contextlib.suppress(OSError, ValueError):
                return cls(
                    os.pathconf(candidate, "PC_NAME_MAX"), os.pathconf(candidate, "PC_PATH_MAX")
                )
        return cls()


@dataclass(frozen=True)
class Destination:
    """A folder an input (or its output) gets names in: `names` are what is made in
    the input's relative subfolder there (temporary names included)."""

    folder: Path
    limits: Limits
    names: tuple[str, ...]


def problem(relative: PurePosixPath, destinations: Iterable[Destination]) -> str | None:
    """What keeps `relative` from being carried to `destinations`, or None if nothing.

    The message says what was expected and what was found.
    """
    if len(relative.parts) > MAX_DEPTH:
        return f"a path at most {MAX_DEPTH} folders deep, found {len(relative.parts)}"
    for destination in destinations:
        limits = destination.limits
        for name in (*relative.parent.parts, *destination.names):
            if byte_length(name) > limits.name_max:
                return (
                    f"names of at most {limits.name_max} bytes in {destination.folder}, "
                    f"found that {name!r} would be {byte_length(name)} bytes"
                )
        folder = destination.folder / relative.parent
        for name in destination.names:
            # The limit counts the path's closing NUL byte.
            path_bytes = byte_length(folder / name)
            if path_bytes >= limits.path_max:
                return (
                    f"paths shorter than {limits.path_max} bytes, found that "
                    f"{str(folder / name)!r} would be {path_bytes} bytes"
                )
    return None


def room(name: str, destinations: Iterable[Destination]) -> int:
    """The most bytes a name may have so that what `destinations` make from it fit,
    where they were made from `name` (the added bytes stay the same)."""
    size = byte_length(name)
    return min(
        destination.limits.name_max - (max(map(byte_length, destination.names)) - size)
        for destination in destinations
    )


def shortened(stem: str, extension: str, size: int) -> str:
    """`<stem><extension>` cut to at most `size` bytes, the stem cut (never the
    extension), at a character boundary where the stem is UTF-8."""
    raw = os.fsencode(stem)[: max(_SHORTEST_STEM, size - byte_length(extension))]
    for cut in range(len(raw), max(len(raw) - 4, 0), -1):
        with contextlib.suppress(UnicodeDecodeError):
            return raw[:cut].decode("utf-8") + extension
    return os.fsdecode(raw) + extension


# Which names are inputs (README: File protocol).

INPUT_SUFFIXES: Final = (".npy", ".npz")
IGNORED_ENDINGS: Final = (".tmp", ".part", ".partial", ".crdownload", "~")


class CandidateFilter:
    """Whether a file name is a niftidrop input (README: File protocol): `*.npy`/`*.npz` in any
    case, never hidden, never a temporary or partial download name."""

    def __init__(
        self,
        suffixes: tuple[str, ...] = INPUT_SUFFIXES,
        ignored_endings: tuple[str, ...] = IGNORED_ENDINGS,
    ) -> None:
        self.suffixes = tuple(suffix.lower() for suffix in suffixes)
        self.ignored_endings = tuple(ending.lower() for ending in ignored_endings)

    def __call__(self, name: str) -> bool:
        lowered = name.lower()
        return (
            not name.startswith(".")
            and lowered.endswith(self.suffixes)
            and not lowered.endswith(self.ignored_endings)
        )

    def __repr__(self) -> str:
        return (
            f"CandidateFilter(suffixes={list(self.suffixes)}, "
            f"hidden=False, ignored_endings={list(self.ignored_endings)})"
        )


is_candidate = CandidateFilter()
