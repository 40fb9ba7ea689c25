"""Tests of the rule on names and paths an input needs in the spool (README: Names)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from niftidrop import names
from niftidrop.names import Destination, Limits


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
