"""The library as each profile sees it (README: Reference matching, Profiles).

A profile may match against its own library folders, with its own `key_pattern`
and `separators`. Each folder is still walked and watched once: the library keeps
one index of every reference in every folder, and a `View` per distinct pair of
(folders, key_pattern) gets an index of its own, derived from that one and kept
in step with it, so a lookup stays a few dict lookups in one index. Without
profiles (or when they all look at every folder with one pattern) the one index
is the view's and nothing is derived.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from niftidrop.matching import MatchRules
from niftidrop.profiles import Profiles
from niftidrop.reference_index import ReferenceIndex, pattern_key

if TYPE_CHECKING:
    from niftidrop.settings import Settings


@dataclass
class KeyedIndex:
    """An index of the references below `roots`, keyed by `pattern` (None: stems).

    `derived`: made from the library's own index (keyed by stems) and kept in step
    with it; else it is the library's own index.
    """

    roots: tuple[str, ...]
    pattern: re.Pattern[str] | None
    derived: bool
    index: ReferenceIndex = field(default_factory=ReferenceIndex)

    def entry(self, stem: str, path: str) -> tuple[str, str] | None:
        """The (key, path) here of the reference `path` keyed `stem` in the library's
        own index; None if this index does not hold it."""
        if not any(path.startswith(root + os.sep) for root in self.roots):
            return None
        key = stem if self.pattern is None else pattern_key(self.pattern, stem)
        return None if key is None else (key, path)


@dataclass(frozen=True)
class View:
    """The rules one profile (or the top level) matches by, and the index they read."""

    rules: MatchRules
    keyed: KeyedIndex
    reference_wait: float
    missing_reference: str


@dataclass(frozen=True)
class ViewPlan:
    """What the library needs to keep its views: every folder it indexes, the key
    pattern of its own index (None when views are derived: keys are stems), the
    view of the top level, and the view of each profile by name."""

    roots: tuple[str, ...]
    pattern: str | None
    top: View
    by_profile: dict[str, View]
    indexes: tuple[KeyedIndex, ...]

    @classmethod
    def single(cls, rules: MatchRules, reference_wait: float, missing_reference: str) -> ViewPlan:
        """One view of every folder by `rules`, whose index is the library's own."""
        keyed = KeyedIndex(rules.folders, rules.pattern, derived=False)
        top = View(rules, keyed, reference_wait, missing_reference)
        return cls(rules.folders, rules.key_pattern, top, {}, (keyed,))

    def view(self, profile: str | None) -> View:
        """The view of `profile` (None: the top level's); KeyError for another name."""
        return self.top if profile is None else self.by_profile[profile]

    def rebuild(self, index: ReferenceIndex) -> None:
        """Point the views at the library's new `index`, or derive theirs from it."""
        for keyed in self.indexes:
            if not keyed.derived:
                keyed.index = index
                continue
            keyed.index = ReferenceIndex(
                found
                for key, paths in index.paths_by_key.items()
                for path in paths
                if (found := keyed.entry(key, path)) is not None
            )

    def apply(
        self, removals: Sequence[tuple[str, str]], additions: Sequence[tuple[str, str]]
    ) -> None:
        """Apply to the derived indexes the changes made to the library's own."""
        for keyed in self.indexes:
            if not keyed.derived:
                continue
            for changes, change in ((removals, keyed.index.discard), (additions, keyed.index.add)):
                for stem, path in changes:
                    found = keyed.entry(stem, path)
                    if found is not None:
                        change(*found)


def plan_views(settings: Settings, folders: Sequence[str] | None = None) -> ViewPlan:
    """The views of `settings`' top level and profiles over `folders` (default:
    every library folder they name). Views with the same folders and pattern share
    one index; when every view has every folder and one pattern, that index is the
    library's own."""
    profiles = Profiles(settings)
    chosen = [settings, *(profiles.named(name) for name in profiles.names)]
    roots = tuple(folders) if folders is not None else _folders(settings.all_library_dirs)
    patterns = {each.key_pattern for each in chosen}
    shared = len(patterns) == 1 and all(_folders(each.library_dirs) == roots for each in chosen)
    indexes: dict[tuple[tuple[str, ...], str | None], KeyedIndex] = {}
    views: list[View] = []
    for each in chosen:
        own = roots if shared else _folders(each.library_dirs)
        rules = MatchRules(each.separators, each.key_pattern, own)
        keyed = indexes.get((own, each.key_pattern))
        if keyed is None:
            keyed = indexes[own, each.key_pattern] = KeyedIndex(
                own, rules.pattern, derived=not shared
            )
        views.append(View(rules, keyed, each.reference_wait, each.missing_reference))
    return ViewPlan(
        roots,
        settings.key_pattern if shared else None,
        views[0],
        dict(zip(profiles.names, views[1:], strict=True)),
        tuple(indexes.values()),
    )


def _folders(paths: Iterable[Path]) -> tuple[str, ...]:
    return tuple(str(path) for path in paths)
