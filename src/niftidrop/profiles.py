"""The profiles in use (README: Configuration, Profiles): each with its effective settings.

The settings of an input are the top-level settings updated by the first profile
whose `match` fits the input's path relative to the inbox (`profile_rules`), or
the top-level settings alone when none does. `Profiles` builds each profile's
settings once, validated as a whole like any `Settings`, and chooses per input.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from niftidrop.profile_rules import PROFILE_KEYS, glob_regex

if TYPE_CHECKING:
    import re

    from niftidrop.settings import Settings


class UnknownProfile(LookupError):
    """`--profile NAME` names no profile of the settings."""


class Profiles:
    """The profiles of `settings`, in order, each with the settings its inputs use.

    `settings` are the top-level settings as they will be used (`for_service()`
    for the service): a profile's settings are those updated by its keys.
    """

    def __init__(self, settings: Settings) -> None:
        self.top = settings
        self._chosen: list[tuple[str, re.Pattern[str], Settings]] = []
        self._named: dict[str, Settings] = {}
        for table in settings.profiles:
            values = {**settings.model_dump(exclude={"profiles"}), **table.settings()}
            effective = type(settings).from_values(**values)  # checked as a whole
            self._chosen.append((table.name, glob_regex(table.match), effective))
            self._named[table.name] = effective

    def __repr__(self) -> str:
        return f"Profiles({self.names!r})"

    def __bool__(self) -> bool:
        return bool(self._chosen)

    @property
    def names(self) -> list[str]:
        """The profiles' names, in the order they are tried."""
        return [name for name, _, _ in self._chosen]

    def choose(self, relative: str) -> tuple[str | None, Settings]:
        """The profile (None: none) and settings of the input at `relative`, its path
        relative to the inbox with `/` between names: the first profile that fits."""
        for name, pattern, settings in self._chosen:
            if pattern.fullmatch(relative) is not None:
                return name, settings
        return None, self.top

    def named(self, name: str) -> Settings:
        """The settings of profile `name`; `UnknownProfile` naming those that exist."""
        try:
            return self._named[name]
        except KeyError:
            known = ", ".join(self.names) or "none is configured"
            raise UnknownProfile(f"no profile named {name!r} (profiles: {known})") from None

    def pick(self, forced: str | None, relative: str) -> tuple[str | None, Settings]:
        """`forced`'s settings (`--profile`), or those `choose` gives `relative`."""
        if forced is not None:
            return forced, self.named(forced)
        return self.choose(relative)

    def report(self) -> list[dict[str, Any]]:
        """Each profile as `niftidrop check` prints it: name, match and the effective
        value of every key a profile may set."""
        tables = {table.name: table for table in self.top.profiles}
        return [
            {
                "name": name,
                "match": tables[name].match,
                **settings.model_dump(mode="json", include=set(PROFILE_KEYS)),
            }
            for name, _, settings in self._chosen
        ]


def inbox_relative(path: Path, inbox: Path) -> str:
    """The path a profile's glob is matched against for a file named on the command
    line: relative to `inbox` when it lies in it, else its file name alone."""
    absolute = path.absolute()
    if absolute.is_relative_to(inbox):
        return absolute.relative_to(inbox).as_posix()
    return absolute.name
