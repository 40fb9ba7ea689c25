"""Tests of the one conversion entry point, `convert_input` (README: Reference matching)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from niftidrop.convert import convert_input
from niftidrop.library import Match
from niftidrop.settings import load_settings

AFFINE = [[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1.0]]


class Recorder:
    """A stand-in for `convert_file` that keeps the arguments of its one call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, source: Path, out_dir: Path, **options: Any) -> str:
        """`convert_file`'s call: the keywords it is given (settings, reference, ...)."""
        wanted = ("reference", "affine", "provenance")
        self.calls.append({"source": source, **{name: options.get(name) for name in wanted}})
        return "result"


class TestConvertInput:
    def test_a_match_gives_its_reference_and_rule(self, tmp_path: Path) -> None:
        """With a match: its reference, no affine, and its rule added to the provenance."""
        recorder = Recorder()
        reference = tmp_path / "case1.nii.gz"
        match = Match("case1.npy", "case1", reference, "exact", (reference,))
        result = convert_input(
            tmp_path / "case1.npy",
            tmp_path,
            match,
            settings=load_settings(default_affine=AFFINE),
            convert_file=recorder,
            provenance={"input": "case1.npy"},
        )
        assert str(result) == "result"
        (call,) = recorder.calls
        assert (call["reference"], call["affine"]) == (reference, None)
        assert call["provenance"] == {"input": "case1.npy", "rule": "exact"}

    def test_an_identity_match_gets_the_default_affine(self, tmp_path: Path) -> None:
        """A match without a reference converts with `default_affine` (or none at all)."""
        match = Match("case1.npy", "case1", None, "identity", ())
        for default, expected in ((AFFINE, np.array(AFFINE)), (None, None)):
            recorder = Recorder()
            settings = load_settings(default_affine=default)
            convert_input(
                tmp_path / "a.npy", tmp_path, match, settings=settings, convert_file=recorder
            )
            (call,) = recorder.calls
            assert call["reference"] is None
            assert call["provenance"] == {"rule": "identity"}
            if expected is None:
                assert call["affine"] is None
            else:
                np.testing.assert_array_equal(call["affine"], expected)

    def test_a_given_reference_adds_no_rule(self, tmp_path: Path) -> None:
        """A reference given for every input (`--reference`) is used as it is."""
        recorder = Recorder()
        reference = tmp_path / "ref.nii.gz"
        settings = load_settings(default_affine=AFFINE)
        convert_input(
            tmp_path / "a.npy", tmp_path, reference, settings=settings, convert_file=recorder
        )
        (call,) = recorder.calls
        assert (call["reference"], call["affine"], call["provenance"]) == (reference, None, None)
