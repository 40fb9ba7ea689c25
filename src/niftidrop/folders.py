"""Which spool folders may lie inside which (README: Configuration).

niftidrop must never feed on its own files: an archive inside the inbox would have
its inputs converted again and again, a library holding the outbox would take
outputs for references. Folders are compared as real paths (symlinks resolved).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final, NamedTuple


def overlaps(named: Iterable[tuple[str, Path]], *, recursive: bool) -> list[str]:
    """Every pair of the `named` folders (setting name, path) where one lies inside
    the other and niftidrop would feed on its own files, in words.

    A folder may lie in a hidden folder (a name starting with ".") of another:
    niftidrop never enters, indexes or writes hidden folders there, which is why
    the default state folder, `<inbox>/.niftidrop`, is fine. Anything inside a
    non-recursive inbox's subfolders is out of its sight too. The state folder
    holds nothing but niftidrop's work files. Library folders may overlap each other.
    """
    placed = [_Placed(name, path, Path(os.path.realpath(path))) for name, path in named]
    return _overlaps_of(placed, recursive)


class _Placed(NamedTuple):
    """A folder setting: its name, its path as configured, and its real path."""

    name: str
    path: Path
    real: Path

    def __str__(self) -> str:
        shown = f"{self.name} {str(self.path)!r}"
        return shown if self.real == self.path else f"{shown} (really {str(self.real)!r})"


# Why a folder may not lie inside each kind of folder.
_WHY_NOT_INSIDE: Final = {
    "inbox": "files niftidrop puts there would be taken for new inputs",
    "outbox": "niftidrop writes outputs there under the inputs' relative paths",
    "archive": "niftidrop moves converted inputs there under their relative paths",
    "failed": "niftidrop moves rejected inputs there under their relative paths",
    "library": "every NIfTI file below it is indexed as a reference",
    "state_dir": "it holds niftidrop's own work files and nothing else",
}


def _overlaps_of(placed: list[_Placed], recursive: bool) -> list[str]:
    """Each pair of `placed` folders (library folders aside) that overlap, in words."""
    problems = []
    for number, first in enumerate(placed):
        for second in placed[number + 1 :]:
            if first.name == second.name == "library":
                continue
            problem = _overlap(first, second, recursive) or _overlap(second, first, recursive)
            if problem is not None:
                problems.append(problem)
    return problems


def _overlap(inner: _Placed, outer: _Placed, recursive: bool) -> str | None:
    """Why `inner` may not lie where it does relative to `outer`; None if it may."""
    if inner.real == outer.real:
        return f"{inner} and {outer} are the same folder: each needs a folder of its own"
    if not inner.real.is_relative_to(outer.real):
        return None
    hidden = any(part.startswith(".") for part in inner.real.relative_to(outer.real).parts)
    if outer.name == "state_dir":
        return f"{inner} is inside {outer}: {_WHY_NOT_INSIDE[outer.name]}; move it out"
    if hidden or (outer.name == "inbox" and not recursive):
        return None
    return (
        f"{inner} is inside {outer}: {_WHY_NOT_INSIDE[outer.name]}; move it out, "
        f"or into a hidden folder there (a name starting with '.')"
    )
