"""Tests of the matching rules, on indexes made in memory: no folders, no threads (README:
Reference matching)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.matching import Match, MatchRules, match
from niftidrop.reference_index import ReferenceIndex, ReferenceKeys

LIBRARY = Path("/library")  # never read: matching works on names alone


@dataclass(frozen=True)
class Matcher:
    """An index of reference names and the rules to match input names against it."""

    index: ReferenceIndex
    rules: MatchRules

    def match(self, name: str) -> Match:
        """`match(index, name, rules)`."""
        return match(self.index, name, self.rules)


def matcher_of(
    folder: Path, *names: str, separators: str = "_-.", key_pattern: str | None = None
) -> Matcher:
    """The references `names` (relative to `folder`) indexed as the scanner keys them."""
    rules = MatchRules(separators, key_pattern, [str(folder)])
    key_of = ReferenceKeys(rules.pattern)
    keyed = [(key_of(Path(name).name), str(folder / name)) for name in names]
    return Matcher(ReferenceIndex((key, path) for key, path in keyed if key is not None), rules)


def refusal(matcher: Matcher, name: str) -> ConversionError:
    """The error `matcher.match(name)` raises; the test fails if it matches instead."""
    with pytest.raises(ConversionError) as raised:
        matcher.match(name)
    return raised.value


class TestRules:
    def test_exact(self) -> None:
        """Rule 1: a reference with the input's key is chosen."""
        matcher = matcher_of(LIBRARY, "case001.nii.gz", "case001_0000.nii.gz")
        reference = LIBRARY / "case001.nii.gz"
        assert matcher.match("case001.npz") == Match(
            "case001.npz", "case001", reference, "exact", (reference,)
        )

    def test_reference_prefix_longest_wins(self) -> None:
        """Rule 2: the longest reference key followed by a separator in the input key wins."""
        matcher = matcher_of(LIBRARY, "case001.nii.gz", "case001_t1.nii.gz", "case00.nii.gz")
        match = matcher.match("case001_t1_pred.npz")
        assert match.rule == "reference_prefix"
        assert match.reference == LIBRARY / "case001_t1.nii.gz"
        assert set(match.candidates) == {
            LIBRARY / "case001_t1.nii.gz",
            LIBRARY / "case001.nii.gz",
        }

    def test_input_prefix_smallest_wins(self) -> None:
        """Rule 3: of the references extending the input key, the smallest key wins."""
        matcher = matcher_of(LIBRARY, "case001_0001.nii.gz", "case001_0000.nii.gz")
        match = matcher.match("case001.npz")
        assert match.rule == "input_prefix"
        assert match.reference == LIBRARY / "case001_0000.nii.gz"
        assert match.candidates == (
            LIBRARY / "case001_0000.nii.gz",
            LIBRARY / "case001_0001.nii.gz",
        )

    def test_rules_apply_in_order(self) -> None:
        """Exact beats both prefix rules, and reference-is-prefix beats input-is-prefix."""
        matcher = matcher_of(LIBRARY, "a.nii", "a_b.nii", "a_b_c.nii")
        assert matcher.match("a_b.npy").rule == "exact"
        matcher = matcher_of(LIBRARY / "two", "a.nii", "a_b_c.nii")
        assert matcher.match("a_b.npy").reference == LIBRARY / "two" / "a.nii"

    def test_prefix_never_ends_inside_a_token(self) -> None:
        """`case1` never matches `case10`, in either direction."""
        matcher = matcher_of(LIBRARY, "case10.nii.gz", "case1x_0000.nii.gz")
        assert refusal(matcher, "case1.npz").code is ErrorCode.NO_REFERENCE
        other = matcher_of(LIBRARY / "other", "case1.nii.gz")
        assert refusal(other, "case10.npz").code is ErrorCode.NO_REFERENCE

    def test_every_separator_counts(self) -> None:
        """Each character of the default separators `_-.` splits tokens."""
        matcher = matcher_of(LIBRARY, "sub-01.nii.gz")
        for name in ("sub-01_pred.npz", "sub-01-pred.npz", "sub-01.pred.npz"):
            assert matcher.match(name).reference == LIBRARY / "sub-01.nii.gz"

    def test_custom_separators(self) -> None:
        """With `separators="-"`, an underscore no longer splits tokens."""
        matcher = matcher_of(LIBRARY, "case001.nii.gz", separators="-")
        assert refusal(matcher, "case001_pred.npz").code is ErrorCode.NO_REFERENCE
        assert matcher.match("case001-pred.npz").rule == "reference_prefix"

    def test_prefix_needs_more_after_the_separator(self) -> None:
        """A key that ends in a separator does not extend the key before it."""
        matcher = matcher_of(LIBRARY, "case001.nii.gz", "x_.nii.gz")
        assert refusal(matcher, "case001_.npz").code is ErrorCode.NO_REFERENCE
        assert refusal(matcher, "x.npz").code is ErrorCode.NO_REFERENCE

    def test_keys_are_case_sensitive(self) -> None:
        """Keys compare case-sensitively."""
        matcher = matcher_of(LIBRARY, "Case001.nii.gz")
        assert refusal(matcher, "case001.npz").code is ErrorCode.NO_REFERENCE

    def test_extensions_are_case_insensitive(self) -> None:
        """`.NII.GZ`, `.Nii` and `.NPZ` count as the usual extensions."""
        matcher = matcher_of(LIBRARY, "a.NII.GZ", "b.Nii")
        assert matcher.match("a.NPZ").reference == LIBRARY / "a.NII.GZ"
        assert matcher.match("b.npy").reference == LIBRARY / "b.Nii"

    def test_no_reference_names_the_input(self) -> None:
        """A name with no reference raises no_reference naming the input and its key."""
        matcher = matcher_of(LIBRARY, "case001.nii.gz")
        refused = refusal(matcher, "other_pred.npz")
        assert refused.code is ErrorCode.NO_REFERENCE
        assert "other_pred.npz" in refused.message
        assert "'other_pred'" in refused.message


class TestAmbiguity:
    def test_same_key_in_two_folders(self) -> None:
        """One key in two library folders is ambiguous, listing both files."""
        first, second = LIBRARY / "a" / "case001.nii.gz", LIBRARY / "b" / "case001.nii.gz"
        matcher = matcher_of(LIBRARY, "a/case001.nii.gz", "b/case001.nii.gz")
        refused = refusal(matcher, "case001_pred.npz")
        assert refused.code is ErrorCode.AMBIGUOUS_REFERENCE
        assert set(refused.candidates) == {first, second}

    def test_nii_and_nii_gz_with_one_key(self) -> None:
        """`x.nii` next to `x.nii.gz` cannot be told apart: ambiguous."""
        matcher = matcher_of(LIBRARY, "x.nii", "x.nii.gz")
        refused = refusal(matcher, "x.npy")
        assert refused.code is ErrorCode.AMBIGUOUS_REFERENCE
        assert len(refused.candidates) == 2

    def test_equally_good_input_prefix_candidates(self) -> None:
        """Two files with the smallest extending key are ambiguous, not picked at random."""
        matcher = matcher_of(
            LIBRARY, "a/case1_0000.nii.gz", "b/case1_0000.nii.gz", "a/case1_0001.nii.gz"
        )
        refused = refusal(matcher, "case1.npz")
        assert refused.code is ErrorCode.AMBIGUOUS_REFERENCE
        assert len(refused.candidates) == 2

    def test_ambiguity_is_per_key(self) -> None:
        """A shared key does not stop other keys from matching."""
        matcher = matcher_of(LIBRARY, "a/dup.nii", "b/dup.nii", "a/fine.nii")
        assert matcher.match("fine.npy").reference == LIBRARY / "a" / "fine.nii"


class TestKeyPattern:
    PATTERN = r"^(?P<key>case\d+)"

    def test_pattern_key_on_both_sides(self) -> None:
        """The `key` group of both names decides, reported as rule key_pattern."""
        matcher = matcher_of(LIBRARY, "case007_ct_0000.nii.gz", key_pattern=self.PATTERN)
        match = matcher.match("case007_seg.npz")
        assert match.rule == "key_pattern"
        assert match.key == "case007"
        assert match.reference == LIBRARY / "case007_ct_0000.nii.gz"

    def test_only_exact_keys_match(self) -> None:
        """With key_pattern the prefix rules do not apply."""
        matcher = matcher_of(LIBRARY, "case1.nii.gz", key_pattern=r"(?P<key>case\d+_\d+)")
        assert refusal(matcher, "case1_2.npz").code is ErrorCode.NO_REFERENCE

    def test_pattern_keys_can_be_ambiguous(self) -> None:
        """Two references with one pattern key are ambiguous."""
        matcher = matcher_of(LIBRARY, "case1_0000.nii", "case1_0001.nii", key_pattern=self.PATTERN)
        assert refusal(matcher, "case1.npz").code is ErrorCode.AMBIGUOUS_REFERENCE

    def test_input_outside_the_pattern(self) -> None:
        """An input whose stem the pattern does not match has no reference, and says why."""
        matcher = matcher_of(LIBRARY, "case1.nii", key_pattern=self.PATTERN)
        refused = refusal(matcher, "scan1.npz")
        assert refused.code is ErrorCode.NO_REFERENCE
        assert "key_pattern" in refused.message

    def test_pattern_needs_a_key_group(self) -> None:
        """A key_pattern without a group named key is refused up front."""
        with pytest.raises(ValueError, match="key"):
            MatchRules(key_pattern=r"case\d+")
