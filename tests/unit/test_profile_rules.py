"""What a profile is (README: Configuration, Profiles): its keys, its table, its glob."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from niftidrop.profile_rules import (
    PROFILE_KEYS,
    ProfileTable,
    glob_matches,
    glob_regex,
    names_once,
    profile_table,
)
from niftidrop.settings import Profile, Settings


def reference_match(glob: str, relative: str) -> bool:
    """The glob's definition, followed literally: names split at `/`; a `**` name
    stands for any number of whole names (none included), tried one by one; every
    other name is matched by the standard library's `fnmatch` (`[` made literal)."""

    def fits(patterns: list[str], names: list[str]) -> bool:
        if not patterns:
            return not names
        head, rest = patterns[0], patterns[1:]
        if head == "**":
            return any(fits(rest, names[skip:]) for skip in range(len(names) + 1))
        literal = head.replace("[", "[[]")
        return bool(names) and fnmatch.fnmatchcase(names[0], literal) and fits(rest, names[1:])

    return fits(glob.split("/"), relative.split("/"))


# Names of an inbox path (no "/", never empty) and glob names (with * ? ** and [).
_NAME = st.text(alphabet="ab.-_[]", min_size=1, max_size=4)
_GLOB_NAME = st.one_of(st.just("**"), st.text(alphabet="ab.*?[", min_size=1, max_size=4), _NAME)
_PATHS = st.lists(_NAME, min_size=1, max_size=4).map("/".join)
_GLOBS = st.lists(_GLOB_NAME, min_size=1, max_size=4).map("/".join)


class TestGlob:
    @given(glob=_GLOBS, relative=_PATHS)
    def test_agrees_with_the_definition(self, glob: str, relative: str) -> None:
        """For any glob of *, ?, ** and literal characters and any relative path,
        the compiled glob fits exactly the paths the definition says."""
        assert glob_matches(glob, relative) == reference_match(glob, relative)

    @given(glob=_GLOBS)
    def test_a_path_made_to_fit_fits(self, glob: str) -> None:
        """The path made by writing each * as "x", each ? as "y" and each ** as one
        name fits the glob (the property above is not met by matching nothing)."""
        made = "/".join(
            "z" if name == "**" else name.replace("*", "x").replace("?", "y")
            for name in glob.split("/")
        )
        assert glob_matches(glob, made)

    @pytest.mark.parametrize(
        ("glob", "relative", "fits"),
        [
            ("nnunet/**", "nnunet/case.npz", True),
            ("nnunet/**", "nnunet/a/b/case.npz", True),
            ("nnunet/**", "monai/case.npz", False),
            ("nnunet/**", "nnunet2/case.npz", False),
            ("*.npz", "case.npz", True),
            ("*.npz", "sub/case.npz", False),  # * never crosses a /
            ("**/*.npz", "case.npz", True),  # ** may be no folder at all
            ("**/*.npz", "a/b/case.npz", True),
            ("a/**/b/*", "a/b/x", True),
            ("a/**/b/*", "a/1/2/b/x", True),
            ("case?.npy", "case1.npy", True),
            ("case?.npy", "case10.npy", False),
            ("case?.npy", "case/.npy", False),  # ? never matches a /
            ("Nnunet/**", "nnunet/case.npz", False),  # case-sensitive
            ("a**b", "axxb", True),  # ** inside a name is *
            ("a**b", "a/b", False),
            ("[ab].npy", "[ab].npy", True),  # [ is literal
            ("[ab].npy", "a.npy", False),
            ("?/**/**", "a", True),  # ** twice is ** once: both may be no folder
            ("**/**/a", "a", True),
            ("a/**/**/b", "a/x/y/b", True),
        ],
    )
    def test_examples(self, glob: str, relative: str, fits: bool) -> None:
        """The README's examples and the edges: *, ?, ** and literal characters."""
        assert glob_matches(glob, relative) is fits

    def test_compiled_once(self) -> None:
        """A glob is compiled once, however many inputs it is tried on."""
        assert glob_regex("x/**") is glob_regex("x/**")


class TestKeys:
    def test_every_key_is_a_setting(self) -> None:
        """Each key a profile may set is a field of the settings model."""
        assert set(PROFILE_KEYS) <= set(Settings.model_fields)

    def test_the_table_has_name_match_and_the_keys(self) -> None:
        """A profile's table holds name, match and exactly the PROFILE_KEYS."""
        assert list(Profile.model_fields) == ["name", "match", *PROFILE_KEYS]
        assert issubclass(Profile, ProfileTable)

    def test_settings_lists_only_the_keys_given(self) -> None:
        """`settings()` is what the profile sets, None values it gives included."""
        profile = Profile(name="p", match="**", axis_order="zyx", npz_key=None)
        assert profile.settings() == {"axis_order": "zyx", "npz_key": None}

    def test_a_table_made_of_other_fields_checks_by_them(self) -> None:
        """`profile_table` takes each key's type and checks from the fields given."""
        table = profile_table(Settings.model_fields, __name__)
        with pytest.raises(ValidationError) as raised:
            table(name="p", match="**", compression_level=9)
        assert raised.value.errors()[0]["loc"] == ("compression_level",)


class TestTable:
    @pytest.mark.parametrize(
        ("values", "loc"),
        [
            ({"match": "a/**"}, ("name",)),
            ({"name": "p"}, ("match",)),
            ({"name": "", "match": "a"}, ("name",)),
            ({"name": "p", "match": "/srv/a/**"}, ("match",)),
            ({"name": "p", "match": "a", "workers": 2}, ("workers",)),
            ({"name": "p", "match": "a", "dtype": "int77"}, ("dtype",)),
            ({"name": "p", "match": "a", "key_pattern": "(?P<id>x)"}, ("key_pattern",)),
            ({"name": "p", "match": "a", "library": []}, ("library",)),
        ],
    )
    def test_refuses(self, values: dict[str, object], loc: tuple[str, ...]) -> None:
        """A missing or empty name or match, an absolute match, a key no profile may
        set, and a value the top-level setting refuses are refused, at that key."""
        with pytest.raises(ValidationError) as raised:
            Profile(**values)
        assert raised.value.errors()[0]["loc"] == loc

    def test_two_profiles_with_one_name_are_refused(self) -> None:
        """Names tell profiles apart: a second profile of the same name is refused,
        both places named."""
        tables = [Profile(name=name, match="**") for name in ("a", "b", "a")]
        with pytest.raises(ValueError, match=r"'a' at profiles\[0\] and profiles\[2\]"):
            names_once(tables)
        assert names_once(tables[:2]) == tables[:2]
