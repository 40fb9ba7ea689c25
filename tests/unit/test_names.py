"""Tests of the rule on names and paths an input needs in the spool (README: Names)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from niftidrop import names
from niftidrop.names import (
    TEMP_EXTRA_CHARS,
    Destination,
    Limits,
    input_key,
    input_stem,
    is_owned_by,
    nifti_prefix,
    reference_key,
    split_name,
    temp_path_for,
    unique_name,
    unique_names,
)


def outbox(*made: str, name_max: int = 255, path_max: int = 4096) -> Destination:
    return Destination(Path("/spool/outbox"), Limits(name_max, path_max), made)


class TestProblem:
    def test_names_within_the_limit_are_no_problem(self) -> None:
        """Every name and path within its file system's limits: nothing to report."""
        assert names.problem(PurePosixPath("a/b.npy"), [outbox("b.nii.gz")]) is None

    def test_a_name_over_the_limit_is_named_with_its_length(self) -> None:
        """The message says the limit, the name and how long it would be."""
        found = names.problem(PurePosixPath("b.npy"), [outbox("b" * 20 + ".nii.gz", name_max=16)])
        assert found is not None
        assert "at most 16 bytes in /spool/outbox" in found
        assert "27 bytes" in found

    def test_lengths_are_counted_in_bytes(self) -> None:
        """A name of 10 characters may be 20 bytes: bytes count."""
        assert names.problem(PurePosixPath("a.npy"), [outbox("é" * 10, name_max=19)]) is not None
        assert names.problem(PurePosixPath("a.npy"), [outbox("é" * 10, name_max=20)]) is None

    def test_subfolders_must_fit_too(self) -> None:
        """A subfolder name that fits the inbox but not another file system is a problem."""
        relative = PurePosixPath("x" * 30) / "a.npy"
        assert names.problem(relative, [outbox("a.nii.gz", name_max=20)]) is not None

    def test_a_path_over_the_path_limit(self) -> None:
        """The limit counts the closing NUL byte, so a path of path_max - 1 bytes fits."""
        fits = 100 - 1 - len("/spool/outbox/")
        assert names.problem(PurePosixPath("a.npy"), [outbox("n" * fits, path_max=100)]) is None
        found = names.problem(PurePosixPath("a.npy"), [outbox("n" * (fits + 1), path_max=100)])
        assert found is not None
        assert "shorter than 100 bytes" in found

    @pytest.mark.parametrize(
        ("folder", "relative"),
        [("/spool/outbox", "a.npy"), ("/spool/outbox", "site/é/a.npy"), ("/", "a.npy")],
    )
    def test_the_path_limit_is_exact_for_any_folder(self, folder: str, relative: str) -> None:
        """The path's bytes as the joined path has them (subfolders, a non-ASCII name,
        the root folder): a path of path_max - 1 bytes fits, one more does not."""
        inner = PurePosixPath(relative)
        for made, fits in (("n", True), ("nn", False)):
            path = Path(folder) / inner.parent / made
            limit = len(os.fsencode(path)) + (1 if fits else 0)
            where = Destination(Path(folder), Limits(255, limit), (made,))
            assert (names.problem(inner, [where]) is None) is fits

    def test_too_many_folders(self) -> None:
        """Deeper than MAX_DEPTH folders cannot be mirrored."""
        relative = PurePosixPath(*["f"] * names.MAX_DEPTH, "a.npy")
        found = names.problem(relative, [outbox("a.nii.gz")])
        assert found is not None
        assert "folders deep" in found


class TestShortening:
    def test_room_is_what_the_longest_made_name_leaves(self) -> None:
        """room() says how long a name may be for every name made from it to fit."""
        made = outbox(".a.npy.error.json.123.tmp", name_max=30)  # 5-byte name, 25 bytes made
        assert names.room("a.npy", [made]) == 10

    def test_the_extension_is_kept(self) -> None:
        """Only the stem is cut."""
        assert names.shortened("case" * 10, ".npz", 12) == "casecase.npz"

    def test_cut_at_a_character_boundary(self) -> None:
        """A UTF-8 stem is never cut inside a character."""
        short = names.shortened("é" * 20, ".npy", 4 + 9)
        assert short == "é" * 4 + ".npy"

    def test_not_utf8_stems_are_cut_as_bytes(self) -> None:
        """A stem of bytes that are not UTF-8 is cut at the byte, and stays bytes."""
        stem = "\udcff" * 20  # 20 bytes 0xff, as os.fsdecode gives them
        assert names.shortened(stem, ".npy", 14) == "\udcff" * 10 + ".npy"

    def test_the_temporary_name_comes_from_the_writer(self) -> None:
        """The temporary name checked is the writer's, whatever its format."""
        made = names.temporary_name("a.nii.gz")
        assert made.startswith(".a.nii.gz")
        assert made.endswith(".tmp")
        written = names.temp_path_for(Path("a.nii.gz"), "x" * names.OWNER_MAX_CHARS).name
        assert len(made) == len(written) == len("a.nii.gz") + names.TEMP_EXTRA_CHARS
        assert names.is_owned_by(made, "x" * names.OWNER_MAX_CHARS)


class TestCandidateFilter:
    @pytest.mark.parametrize("name", ["a.npy", "A.NPZ", "case_1.Npy", "x.y.npz"])
    def test_accepts_inputs_in_any_case(self, name: str) -> None:
        """*.npy and *.npz are candidates whatever the case of the extension."""
        assert names.is_candidate(name)

    @pytest.mark.parametrize(
        "name",
        [
            ".a.npy",
            "a.npy.tmp",
            "a.npy.part",
            "a.npz.partial",
            "a.npy.crdownload",
            "a.npy~",
            "a.nii.gz",
            "a.txt",
            "npy",
        ],
    )
    def test_refuses_hidden_temporary_and_other_names(self, name: str) -> None:
        """Hidden, temporary, partial-download and non-array names are never touched."""
        assert not names.is_candidate(name)

    def test_repr_shows_the_rules(self) -> None:
        """The filter's repr says what it accepts."""
        text = repr(names.CandidateFilter())
        assert ".npz" in text
        assert ".crdownload" in text


class TestKeys:
    def test_input_key_strips_numpy_extensions_any_case(self) -> None:
        """Input keys drop .npy/.npz whatever their case, and any folder part."""
        assert input_key("case001.npz") == "case001"
        assert input_key("sub/case001_pred.NPY") == "case001_pred"
        assert input_key("case001") == "case001"

    def test_reference_key_strips_nifti_extensions_any_case(self) -> None:
        """Reference keys drop .nii/.nii.gz whatever their case; other names are not references."""
        assert reference_key("case001.nii.gz") == "case001"
        assert reference_key("Case001.NII.GZ") == "Case001"
        assert reference_key("case001.Nii") == "case001"
        assert reference_key("case001.npz") is None
        assert reference_key("case001.nii.gz.part") is None
        assert reference_key(".nii.gz") is None

    def test_stems_drop_the_input_or_nifti_extension(self) -> None:
        """Outputs are named after the name without .npy/.npz, or .nii/.nii.gz."""
        assert input_stem("case.1.NPZ") == "case.1"
        assert input_stem("data.bin") == "data"
        assert nifti_prefix("Case001.NII.GZ") == "Case001"
        assert nifti_prefix("case001.img") == "case001"


class TestUniqueNames:
    def test_split_name_keeps_dots_in_the_stem(self) -> None:
        """Only the final .npy/.npz (any case) is the extension."""
        assert split_name("case.1.NPZ") == ("case.1", ".NPZ")
        assert split_name("a.npy") == ("a", ".npy")

    def test_unique_names_suffix_before_the_extension(self) -> None:
        """Taken names get -1, -2, ... before the extension."""
        names = unique_names("scan.npz")
        assert [next(names) for _ in range(3)] == ["scan.npz", "scan-1.npz", "scan-2.npz"]

    @pytest.mark.parametrize(
        ("name", "expected"),
        [("a.nii.gz", "a-3.nii.gz"), ("a.nii", "a-3.nii"), ("a", "a-3"), (".x", ".x-3")],
    )
    def test_unique_name(self, name: str, expected: str) -> None:
        """The suffix goes before the whole extension."""
        assert unique_name(Path(name), 3) == Path(expected)

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("case.v2.nii.gz", "case.v2-1.nii.gz"),
            ("case.v2.npy", "case.v2-1.npy"),
            ("case.v2.json", "case.v2-1.json"),
            ("Scan.NPZ", "Scan-1.NPZ"),
            ("a.tar.gz", "a.tar-1.gz"),
            (".npy", ".npy-1"),
        ],
    )
    def test_one_rule_for_outputs_archive_and_failed(self, name: str, expected: str) -> None:
        """The suffix goes before a known extension (any case), else before the last dot."""
        assert unique_name(Path(name), 1) == Path(expected)
        made = unique_names(name)
        assert [next(made), next(made)] == [name, expected]


class TestOwners:
    def test_owned_temporaries_are_told_apart(self, tmp_path: Path) -> None:
        """An owner's names, and its parts', are its own; others' and untagged ones are not."""
        mine = temp_path_for(tmp_path / "a.nii.gz", "0a1b2c3d").name
        part = temp_path_for(tmp_path / "a.nii.gz", "0a1b2c3d-tok3n").name
        theirs = temp_path_for(tmp_path / "a.nii.gz", "ffffffff").name
        untagged = temp_path_for(tmp_path / "a.nii.gz").name
        assert is_owned_by(mine, "0a1b2c3d")
        assert is_owned_by(part, "0a1b2c3d")
        assert not is_owned_by(part, "0a1b2c3d-other")
        assert not is_owned_by(theirs, "0a1b2c3d")
        assert not is_owned_by(untagged, "0a1b2c3d")
        assert not is_owned_by("a.nii.gz", "0a1b2c3d")
        assert len(mine) <= len("a.nii.gz") + TEMP_EXTRA_CHARS

    def test_an_owner_with_a_dot_is_refused(self, tmp_path: Path) -> None:
        """The owner part is found by its dots: it cannot hold one."""
        with pytest.raises(ValueError, match="owner"):
            temp_path_for(tmp_path / "a", "x.y")
