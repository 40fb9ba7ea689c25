"""The matching rules: which reference an input name resolves to, and why.

See the README, "Reference matching". `match` is a function of a `ReferenceIndex`,
an input name and the `MatchRules`: a few dict lookups and one bisect in memory,
never a disk access, and no lock (the caller holds the index still).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.names import input_key
from niftidrop.reference_index import ReferenceIndex, pattern_key

__all__ = ["Match", "MatchReport", "MatchRules", "Rule", "describe", "match"]

Rule = Literal["exact", "reference_prefix", "input_prefix", "key_pattern", "identity"]


@dataclass(frozen=True)
class Match:
    """Which reference an input name resolves to, and why."""

    name: str  # the input name asked about
    key: str  # its key
    reference: Path | None  # None only for rule "identity"
    rule: Rule  # "key_pattern": rule 1 (exact) applied to the keys key_pattern extracts
    candidates: tuple[Path, ...]  # every reference the deciding rule considered


class MatchReport(TypedDict):
    """A match or its refusal as plain data: what `niftidrop match --json` prints."""

    name: str
    key: str | None
    reference: str | None
    rule: Rule | None
    candidates: list[str]
    error: str | None  # an ErrorCode value
    message: str | None


class MatchRules:
    """What the matching rules depend on, checked when made.

    `separators` split keys into tokens (each character once); with `key_pattern`
    (a regex with a group named key) keys are what that group extracts and only
    exact keys match. `folders` are the library folders, named when nothing matches.
    """

    __slots__ = ("folders", "key_pattern", "one_separator", "pattern", "separators")

    def __init__(
        self,
        separators: str = "_-.",
        key_pattern: str | None = None,
        folders: Sequence[str] = (),
    ) -> None:
        if not separators:
            raise ValueError("separators: expected at least one character, found none")
        self.separators = "".join(dict.fromkeys(separators))
        self.one_separator = str.maketrans(dict.fromkeys(self.separators, self.separators[0]))
        self.key_pattern = key_pattern
        self.pattern = re.compile(key_pattern) if key_pattern is not None else None
        if self.pattern is not None and "key" not in self.pattern.groupindex:
            raise ValueError(f"key_pattern: expected a group named key in {key_pattern!r}")
        self.folders = tuple(folders)

    def __repr__(self) -> str:
        return f"MatchRules(separators={self.separators!r}, key_pattern={self.key_pattern!r})"

    def key_for(self, name: str) -> str | None:
        """The key of input `name` (after `key_pattern`); None if the pattern does not match."""
        stem = input_key(name)
        return stem if self.pattern is None else pattern_key(self.pattern, stem)


def match(index: ReferenceIndex, name: str, rules: MatchRules) -> Match:
    """The reference in `index` for input `name` by the README's matching rules.

    Raises `ConversionError` with `no_reference`, or `ambiguous_reference`
    carrying the equally good candidates.
    """
    key = rules.key_for(name)
    if key is None:
        raise ConversionError(
            ErrorCode.NO_REFERENCE,
            f"{name}: expected a stem matching key_pattern {rules.key_pattern!r}, "
            f"found {input_key(name)!r}",
        )
    if key in index:
        rule: Rule = "exact" if rules.pattern is None else "key_pattern"
        return _decide(index, name, key, rule, [key])
    if rules.pattern is None:
        prefixes = _reference_prefixes(index, key, rules)
        if prefixes:
            return _decide(index, name, key, "reference_prefix", prefixes)
        extending = index.keys_extending(key, rules.separators)
        if extending:
            return _decide(index, name, key, "input_prefix", extending)
    raise ConversionError(
        ErrorCode.NO_REFERENCE,
        f"{name}: expected {_rules_text(key, rules)}, "
        f"found none among {index.size} references in {', '.join(rules.folders)}",
    )


def describe(index: ReferenceIndex, name: str, rules: MatchRules) -> MatchReport:
    """`match` as plain data, an error included (for `niftidrop match --json`)."""
    try:
        found = match(index, name, rules)
    except ConversionError as error:
        return {
            "name": name,
            "key": rules.key_for(name),
            "reference": None,
            "rule": None,
            "candidates": [str(path) for path in error.candidates],
            "error": error.code.value,
            "message": error.message,
        }
    return {
        "name": name,
        "key": found.key,
        "reference": str(found.reference),
        "rule": found.rule,
        "candidates": [str(path) for path in found.candidates],
        "error": None,
        "message": None,
    }


def _reference_prefixes(index: ReferenceIndex, key: str, rules: MatchRules) -> list[str]:
    """Rule 2: reference keys that `key` continues after a separator, longest first.

    One dict lookup per separator in `key`: with every separator mapped to the
    first one, `rfind` walks from one separator to the previous.
    """
    marked = key.translate(rules.one_separator)
    separator = rules.separators[0]
    found = []
    # Neither end: a prefix is not empty, and "more" after the separator is not.
    end = marked.rfind(separator, 1, len(key) - 1)
    while end > 0:
        if key[:end] in index:
            found.append(key[:end])
        end = marked.rfind(separator, 1, end)
    return found


def _rules_text(key: str, rules: MatchRules) -> str:
    if rules.pattern is not None:
        return f"a reference whose key_pattern key is {key!r}"
    return (
        f"a reference keyed {key!r}, a prefix of it, or {key!r} plus a suffix "
        f"(separated by one of {rules.separators!r})"
    )


def _decide(
    index: ReferenceIndex, name: str, key: str, rule: Rule, candidate_keys: list[str]
) -> Match:
    """The match for the first of `candidate_keys`, refused when that key is shared."""
    chosen = index.paths(candidate_keys[0])
    if len(chosen) > 1:
        raise ConversionError(
            ErrorCode.AMBIGUOUS_REFERENCE,
            f"{name}: expected one reference for key {candidate_keys[0]!r} (rule {rule}), "
            f"found {len(chosen)}: {', '.join(chosen)}",
            candidates=[index.path(path) for path in chosen],
        )
    candidates = tuple(
        [index.path(path) for other in candidate_keys for path in index.paths(other)]
    )
    return Match(name, key, candidates[0], rule, candidates)
