"""What a profile is (README: Configuration, Profiles): its keys and its `match` glob.

A profile is a TOML table of `[[profiles]]`: a `name`, a `match` glob on an
input's path relative to the inbox, and any of the settings in `PROFILE_KEYS`.
Its table type is made from the settings model's own fields (`profile_table`), so
a profile's value is checked by exactly the rule the top-level setting is, and an
unknown key is refused as one is at the top level.

The glob (`glob_regex`) splits both sides at `/`: `*` matches any characters of
one name (none included, never a `/`), `?` exactly one character of a name, and a
name that is `**` alone any number of whole names (none included): `nnunet/**`
is every file below `nnunet/`, `**/*.npz` every `.npz` at any depth. `**` inside a
name is `*`. Every other character stands for itself (`[` too), case-sensitively.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

# The settings a profile may set: conversion and matching. One line adds one.
PROFILE_KEYS: Final = (
    "dtype",
    "axis_order",
    "channels",
    "npz_key",
    "compress",
    "compression_level",
    "on_conflict",
    "sidecar",
    "preview",
    "labels",
    "library",
    "key_pattern",
    "separators",
    "missing_reference",
    "default_affine",
    "reference_wait",
)


def _glob_is_relative(value: str) -> str:
    if value.startswith("/"):
        raise ValueError("expected a glob on the path relative to the inbox (no leading /)")
    return value


ProfileName = Annotated[str, Field(min_length=1, description="shown in logs and sidecars")]
Glob = Annotated[
    str,
    Field(min_length=1, description="a glob on the input's path relative to the inbox"),
    AfterValidator(_glob_is_relative),
]


class ProfileTable(BaseModel):
    """One `[[profiles]]` table: its name, its glob, and (in the subclass that
    `profile_table` makes) the settings it sets, None where it sets none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ProfileName
    match: Glob

    def settings(self) -> dict[str, Any]:
        """The settings this profile sets, by name (a key it does not name is absent)."""
        return {key: getattr(self, key) for key in PROFILE_KEYS if key in self.model_fields_set}


def profile_table(fields: Mapping[str, FieldInfo], module: str) -> type[ProfileTable]:
    """The table type of a profile whose keys are the settings' `fields` named in
    `PROFILE_KEYS`: each with the field's type and checks, and no default (a
    profile that does not set a key leaves the top-level value). It is to be
    `module`'s global `Profile`, where pickle finds it (settings go to the
    conversion processes pickled)."""
    keys: dict[str, Any] = {
        key: (_checked_type(fields[key]), Field(default=None, description=fields[key].description))
        for key in PROFILE_KEYS
    }
    return create_model("Profile", __base__=ProfileTable, __module__=module, **keys)


def _checked_type(field: FieldInfo) -> Any:
    """A field's type with its checks attached (its ranges, its validators)."""
    if not field.metadata:
        return field.annotation
    return Annotated[(field.annotation, *field.metadata)]


def names_once(profiles: list[ProfileTable]) -> list[ProfileTable]:
    """Refuse two profiles with one name: logs and `--profile` tell them apart by it."""
    first: dict[str, int] = {}
    for number, profile in enumerate(profiles):
        if profile.name in first:
            raise ValueError(
                f"expected each profile name once, found {profile.name!r} at "
                f"profiles[{first[profile.name]}] and profiles[{number}]"
            )
        first[profile.name] = number
    return profiles


@functools.lru_cache(maxsize=256)
def glob_regex(glob: str) -> re.Pattern[str]:
    """The regular expression that matches, whole, the relative paths `glob` fits."""
    parts: list[str] = []
    # `**/**` is `**`: both may be no folder, which the translation below assumes once.
    names: list[str] = []
    for name in glob.split("/"):
        if not (name == "**" and names[-1:] == ["**"]):
            names.append(name)
    separated = False  # whether the next name needs a "/" before it
    for number, name in enumerate(names):
        if name == "**":
            last = number == len(names) - 1
            if last:
                parts.append("(?:/[^/]+)*" if separated else "(?:[^/]+(?:/[^/]+)*)?")
            else:
                parts.append("/(?:[^/]+/)*" if separated else "(?:[^/]+/)*")
            separated = False
            continue
        if separated:
            parts.append("/")
        parts.append("".join(_CHARACTERS.get(char) or re.escape(char) for char in name))
        separated = True
    return re.compile("".join(parts))


_CHARACTERS: Final = {"*": "[^/]*", "?": "[^/]"}


def glob_matches(glob: str, relative: str) -> bool:
    """Whether the path `relative` (to the inbox, names split by `/`) fits `glob`."""
    return glob_regex(glob).fullmatch(relative) is not None
