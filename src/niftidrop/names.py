"""The rules on names (README: File protocol): stems, keys, suffixes, temporary
and unique names, and whether an input's name can be carried through the spool.

An input's stem is its name without `.npy`/`.npz` (any case); a reference's key
is its name without `.nii`/`.nii.gz`. A taken name in archive, failed or (with
`on_conflict = "rename"`) the outbox gets a unique suffix `-1`, `-2`, ... before
its extension. Files are first written under a hidden temporary name
(`.<name>.<owner>.<random>.tmp`), which `niftidrop.writer` writes.

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
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

INPUT_SUFFIXES: Final = (".npy", ".npz")
NIFTI_SUFFIXES: Final = (".nii.gz", ".nii")  # longest first: ".nii.gz" ends in neither
# The label table beside a label map (README: Conversion, labels).
DSEG_SUFFIX: Final = ".dseg.tsv"
# The extensions a unique suffix goes before (longest first); other names get it
# before their last dot.
KNOWN_EXTENSIONS: Final = (*NIFTI_SUFFIXES, *INPUT_SUFFIXES, ".json", DSEG_SUFFIX)
TEMP_PREFIX: Final = "."
TEMP_SUFFIX: Final = ".tmp"
# Characters a temporary name adds to the final name at most, for an owner of up
# to OWNER_MAX_CHARS: the dot before the name, the owner's and the random part's
# dots, RANDOM_DIGITS random hex digits and the suffix.
OWNER_MAX_CHARS: Final = 24
RANDOM_DIGITS: Final = 12
TEMP_EXTRA_CHARS: Final = (
    len(TEMP_PREFIX) + 1 + OWNER_MAX_CHARS + 1 + RANDOM_DIGITS + len(TEMP_SUFFIX)
)
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


def known_suffix(name: str, suffixes: Iterable[str]) -> str:
    """The one of `suffixes` (lower case, longest first) that `name` ends in, in any
    case and after at least one other character, as spelled in `name`; "" if none."""
    lowered = name.lower()
    for suffix in suffixes:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[-len(suffix) :]
    return ""


def split_name(name: str, extensions: Iterable[str] = INPUT_SUFFIXES) -> tuple[str, str]:
    """`name` as (stem, extension) where the extension is one of `extensions` in any
    case (`.npy`/`.npz` unless told), else what follows the last dot."""
    extension = known_suffix(name, extensions)
    if extension:
        return name[: -len(extension)], extension
    stem, dot, extension = name.rpartition(".")
    return (stem, dot + extension) if stem else (name, "")


def input_stem(name: str) -> str:
    """An input's name without its `.npy` / `.npz` extension (any case): what its
    outputs are named after."""
    return split_name(name)[0]


def input_key(name: str) -> str:
    """The key of an input name: its file name without `.npy`/`.npz` (any case)."""
    base = name.rpartition("/")[2]  # not Path(name).name: this runs on every lookup
    extension = known_suffix(base, INPUT_SUFFIXES)
    return base[: -len(extension)] if extension else base


def reference_key(name: str) -> str | None:
    """The key of a reference file name (stem before `.nii`/`.nii.gz`), None if not one."""
    extension = known_suffix(name, NIFTI_SUFFIXES)
    return name[: -len(extension)] if extension else None


def nifti_prefix(name: str) -> str:
    """A NIfTI file's name without `.nii`/`.nii.gz` (any case): what
    `nifti_to_numpy` names its output after."""
    return split_name(name, NIFTI_SUFFIXES)[0]


def suffixed(name: str, suffix: str) -> str:
    """`name` with `suffix` before its extension (a known one, else after the last dot)."""
    stem, extension = split_name(name, KNOWN_EXTENSIONS)
    return f"{stem}{suffix}{extension}"


def unique_name(final: Path, number: int) -> Path:
    """`final` with `-<number>` before its extension (`a.nii.gz` -> `a-2.nii.gz`)."""
    return final.with_name(suffixed(final.name, f"-{number}"))


def unique_names(name: str) -> Iterator[str]:
    """`name`, then `<stem>-1<ext>`, `<stem>-2<ext>`, ... (the suffix before the extension)."""
    yield name
    number = 1
    while True:
        yield suffixed(name, f"-{number}")
        number += 1


def temp_path_for(final: Path, owner: str = "") -> Path:
    """A fresh hidden temporary name next to `final`, tagged with `owner` if given."""
    random = secrets.token_hex(RANDOM_DIGITS // 2)
    return final.with_name(_temp_name(final.name, owner, random))


def _temp_name(name: str, owner: str, random: str) -> str:
    if owner and ("." in owner or "/" in owner or len(owner) > OWNER_MAX_CHARS):
        raise ValueError(f"owner: expected at most {OWNER_MAX_CHARS} characters, no dot or /")
    tag = f"{owner}." if owner else ""
    return f"{TEMP_PREFIX}{name}.{tag}{random}{TEMP_SUFFIX}"


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


def temporary_name(name: str) -> str:
    """The longest hidden temporary name niftidrop writes before `name` exists: one
    `temp_path_for` makes, with the longest owner (its random part costs a system
    call, and only its length matters here)."""
    return _temp_name(name, "x" * OWNER_MAX_CHARS, "0" * RANDOM_DIGITS)


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
    subfolders = relative.parent.parts
    for destination in destinations:
        limits = destination.limits
        for name in (*subfolders, *destination.names):
            if byte_length(name) > limits.name_max:
                return (
                    f"names of at most {limits.name_max} bytes in {destination.folder}, "
                    f"found that {name!r} would be {byte_length(name)} bytes"
                )
        folder = destination.folder / relative.parent if subfolders else destination.folder
        # Counted rather than joined for each name (a Path per name was most of
        # the cost of this check, made for every input claimed).
        folder_bytes = byte_length(folder) + (0 if str(folder).endswith("/") else 1)
        for name in destination.names:
            # The limit counts the path's closing NUL byte.
            path_bytes = folder_bytes + byte_length(name)
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

IGNORED_ENDINGS: Final = (".tmp", ".part", ".partial", ".crdownload", "~")


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden: never listed, watched or entered."""
    return name.startswith(".")


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
            not is_hidden(name)
            and lowered.endswith(self.suffixes)
            and not lowered.endswith(self.ignored_endings)
        )

    def __repr__(self) -> str:
        return (
            f"CandidateFilter(suffixes={list(self.suffixes)}, "
            f"hidden=False, ignored_endings={list(self.ignored_endings)})"
        )


is_candidate = CandidateFilter()


def inbox_path_problem(relative: PurePosixPath) -> str | None:
    """Why the service would never take a file at `relative` under the inbox (with
    `recursive`, the default), in words; None if it would: a relative path that stays
    inside the inbox, through no hidden folder, to a candidate name."""
    if relative.is_absolute():
        return "a path relative to the inbox, found an absolute path"
    if not relative.parts:
        return "a file name, found none"
    if ".." in relative.parts:
        return "a path that stays inside the inbox, found '..'"
    for folder in relative.parts[:-1]:
        if is_hidden(folder):
            return f"no hidden folder on the way, found {folder!r}"
    if not is_candidate(relative.name):
        return (
            "a name ending in .npy or .npz, not hidden (starting with '.') and not ending "
            f"in {', '.join(IGNORED_ENDINGS)}, found {relative.name!r}"
        )
    return None
