"""`niftidrop convert IN... [-o DIR] [--reference REF]`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from niftidrop.cli import ExitCode, main
from real_command import niftidrop

MakeReference = Callable[..., Path]


class TestConvertCommand:
    def test_converts_with_explicit_reference(
        self, make_reference: MakeReference, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Every input uses --reference; one `<input> -> <output>` line each; exit 0."""
        reference = make_reference(shape=(4, 5, 6))
        for name in ("a.npy", "b.npy"):
            np.save(name, np.zeros((4, 5, 6), np.float32))
        code = main(["convert", "a.npy", "b.npy", "-o", "out", "--reference", str(reference)])
        assert code == ExitCode.OK
        lines = capsys.readouterr().out.splitlines()
        assert lines == [
            f"a.npy -> {Path('out/a.nii.gz')}",
            f"b.npy -> {Path('out/b.nii.gz')}",
        ]
        assert nib.load("out/b.nii.gz").shape == (4, 5, 6)

    def test_rejection_prints_code_and_exits_1(
        self, make_reference: MakeReference, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A rejected input prints `<input>: <code>: <message>`, the rest still converts."""
        reference = make_reference(shape=(4, 5, 6))
        np.save("bad.npy", np.zeros((3, 3, 3), np.float32))
        np.save("good.npy", np.zeros((4, 5, 6), np.float32))
        code = main(["convert", "bad.npy", "good.npy", "-o", "o", "--reference", str(reference)])
        assert code == ExitCode.FAILED
        captured = capsys.readouterr()
        assert captured.err.startswith("bad.npy: shape_mismatch: bad.npy: expected shape (4, 5, 6)")
        assert "good.npy -> " in captured.out

    def test_missing_input_is_a_plain_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A nonexistent input gives a message without an error code, exit 1."""
        code = main(["convert", "nothing.npy", "--reference", "ref.nii.gz"])
        assert code == ExitCode.FAILED
        err = capsys.readouterr().err
        assert "nothing.npy: no such file" in err
        assert "bad_reference" not in err

    def test_library_matching_and_outbox_default(
        self, make_reference: MakeReference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without --reference the library resolves each input; output goes to the outbox."""
        library = tmp_path / "lib"
        library.mkdir()
        reference = make_reference("lib/case001.nii.gz", shape=(4, 5, 6))
        np.save("case001_pred.npy", np.ones((4, 5, 6), np.uint8))
        code = main(["convert", "case001_pred.npy", "--library", str(library), "--outbox", "outs"])
        assert code == ExitCode.OK, capsys.readouterr().err
        written = nib.load("outs/case001_pred.nii.gz")
        np.testing.assert_array_equal(written.affine, nib.load(reference).affine)

    def test_no_reference_in_library_fails(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An input without a reference is no_reference (missing_reference = fail)."""
        (tmp_path / "lib").mkdir()
        np.save("x.npy", np.ones((2, 2, 2), np.uint8))
        code = main(["convert", "x.npy", "--library", str(tmp_path / "lib")])
        assert code == ExitCode.FAILED
        assert capsys.readouterr().err.startswith("x.npy: no_reference: ")

    def test_identity_fallback_uses_default_affine(self, tmp_path: Path) -> None:
        """missing_reference=identity writes default_affine when it is set."""
        (tmp_path / "lib").mkdir()
        np.save("x.npy", np.ones((2, 2, 2), np.uint8))
        affine = "[[2,0,0,1],[0,2,0,2],[0,0,2,3],[0,0,0,1]]"
        code = main(
            [
                "convert",
                "x.npy",
                "-o",
                "o",
                "--library",
                str(tmp_path / "lib"),
                "--missing-reference",
                "identity",
                "--default-affine",
                affine,
            ]
        )
        assert code == ExitCode.OK
        np.testing.assert_array_equal(
            nib.load("o/x.nii.gz").affine, np.array(json.loads(affine), dtype=float)
        )


class TestMissingLibrary:
    def test_a_library_that_does_not_exist_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without --reference, a library folder that does not exist is named in an
        error and nothing is converted: exit 2."""
        np.save("x.npy", np.ones((2, 2, 2), np.uint8))
        missing = tmp_path / "nonexistent"
        assert (
            main(["convert", "x.npy", "-o", "o", "--library", str(missing)]) == ExitCode.BAD_CONFIG
        )
        assert f"niftidrop: error: library: {missing} does not exist" in capsys.readouterr().err
        assert not Path("o").exists()

    def test_with_identity_it_is_a_warning(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With missing_reference = identity no library is needed: a warning, and the
        input is converted with the identity affine."""
        np.save("x.npy", np.ones((2, 2, 2), np.uint8))
        missing = tmp_path / "nonexistent"
        argv = ["convert", "x.npy", "-o", "o", "--library", str(missing)]
        assert main([*argv, "--missing-reference", "identity"]) == ExitCode.OK
        assert f"warning: library: {missing} does not exist" in capsys.readouterr().err
        np.testing.assert_array_equal(nib.load("o/x.nii.gz").affine, np.eye(4))


class TestProgress:
    def _convert_two(self, make_reference: MakeReference) -> None:
        reference = make_reference(shape=(2, 2, 2))
        for name in ("a.npy", "b.npy"):
            np.save(name, np.zeros((2, 2, 2), np.uint8))
        assert main(["convert", "a.npy", "b.npy", "-o", "o", "--reference", str(reference)]) == 0

    def test_bar_on_a_terminal(
        self,
        make_reference: MakeReference,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Several inputs and stderr on a terminal: a progress bar on stderr only."""
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        self._convert_two(make_reference)
        captured = capsys.readouterr()
        assert "2/2" in captured.err
        assert "2/2" not in captured.out

    def test_no_bar_otherwise(
        self, make_reference: MakeReference, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without a terminal (logs, pipes) there is no progress bar."""
        self._convert_two(make_reference)
        assert capsys.readouterr().err == ""


class TestConvertWithLabels:
    """`niftidrop convert --labels ...` (README: Conversion, labels), as a user runs it."""

    def test_a_label_map_gets_its_table_and_intent(
        self, make_reference: MakeReference, tmp_path: Path
    ) -> None:
        """The real command with a dataset.json: intent 1002, `<stem>.dseg.tsv`, exit 0."""
        reference = make_reference(shape=(4, 5, 6))
        dataset = tmp_path / "dataset.json"
        dataset.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}))
        np.save(tmp_path / "case.npy", (np.arange(120) % 3).astype(np.uint8).reshape(4, 5, 6))
        done = niftidrop(
            "convert", "case.npy", "-o", "out", "--reference", str(reference),
            "--labels", str(dataset), cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == ExitCode.OK, done.stderr
        assert done.stdout == f"case.npy -> {Path('out/case.nii.gz')}\n"
        assert done.stderr == ""
        assert int(nib.load(tmp_path / "out" / "case.nii.gz").header["intent_code"]) == 1002
        assert (tmp_path / "out" / "case.dseg.tsv").read_text() == (
            "index\tname\n0\tbackground\n1\tliver\n2\ttumour\n"
        )

    def test_values_without_a_name_are_a_warning(
        self, make_reference: MakeReference, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Values the table lacks: a warning on stderr, the input converted, exit 0."""
        reference = make_reference(shape=(4, 5, 6))
        np.save("case.npy", (np.arange(120) % 5).astype(np.uint8).reshape(4, 5, 6))
        code = main(
            ["convert", "case.npy", "-o", "out", "--reference", str(reference),
             "--labels", '{"1": "liver", "2": "tumour"}']
        )  # fmt: skip
        assert code == ExitCode.OK
        captured = capsys.readouterr()
        assert captured.out == f"case.npy -> {Path('out/case.nii.gz')}\n"
        assert captured.err == (
            "niftidrop: warning: case.npy: labels_incomplete: no name in labels for 3, 4\n"
        )

    def test_a_bad_labels_value_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A dataset.json that does not exist is a configuration error: exit 2, named."""
        code = main(["convert", "case.npy", "--labels", "missing/dataset.json"])
        assert code == ExitCode.BAD_CONFIG
        assert capsys.readouterr().err.startswith("niftidrop: flag --labels: expected ")


class TestProfiles:
    """Profiles (README: Configuration, Profiles): each input converts with the
    profile its path in the inbox (or, outside it, its file name) falls under."""

    @pytest.fixture
    def config(self, tmp_path: Path, make_reference: MakeReference) -> Path:
        """A library with `case.nii.gz` (4, 5, 6) and a profile for (C, Z, Y, X) argmax."""
        (tmp_path / "library").mkdir()
        reference = make_reference("library/case.nii.gz", shape=(4, 5, 6))
        toml = tmp_path / "niftidrop.toml"
        toml.write_text(
            f'root = "{tmp_path}"\nlibrary = ["{reference.parent}"]\n'
            '[[profiles]]\nname = "nnunet"\nmatch = "nnunet/**"\naxis_order = "zyx"\n'
            'channels = "argmax"\n'
        )
        return toml

    @staticmethod
    def scores() -> np.ndarray:
        """Class scores (C, X, Y, Z) for the reference's grid."""
        return np.random.default_rng(5).random((3, 4, 5, 6)).astype(np.float32)

    def test_an_input_in_the_inbox_takes_its_profile(self, tmp_path: Path, config: Path) -> None:
        """`inbox/nnunet/case.npy` converts by the nnunet profile (zyx, argmax); the
        same array outside the inbox converts with the top-level settings (the real
        command)."""
        zyx = np.ascontiguousarray(self.scores().transpose(0, 3, 2, 1))
        (tmp_path / "inbox" / "nnunet").mkdir(parents=True)
        np.save(tmp_path / "inbox" / "nnunet" / "case.npy", zyx)
        np.save(tmp_path / "case.npy", self.scores())
        done = niftidrop(
            "convert",
            "--config",
            str(config),
            "-o",
            "by_profile",
            "inbox/nnunet/case.npy",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        labels = np.asanyarray(nib.load(tmp_path / "by_profile" / "case.nii.gz").dataobj)
        assert np.array_equal(labels, np.argmax(self.scores(), axis=0).astype(np.uint8))
        done = niftidrop("convert", "--config", str(config), "-o", "top", "case.npy", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        kept = np.asanyarray(nib.load(tmp_path / "top" / "case.nii.gz").dataobj)
        assert np.array_equal(kept, np.moveaxis(self.scores(), 0, -1))

    def test_profile_forces_one_outside_the_inbox(self, tmp_path: Path, config: Path) -> None:
        """`--profile nnunet` converts a file anywhere by that profile."""
        np.save(tmp_path / "case.npy", np.ascontiguousarray(self.scores().transpose(0, 3, 2, 1)))
        argv = [
            "convert",
            "--config",
            str(config),
            "-o",
            str(tmp_path / "o"),
            "--profile",
            "nnunet",
        ]
        assert main([*argv, str(tmp_path / "case.npy")]) == ExitCode.OK
        labels = np.asanyarray(nib.load(tmp_path / "o" / "case.nii.gz").dataobj)
        assert np.array_equal(labels, np.argmax(self.scores(), axis=0).astype(np.uint8))

    def test_an_unknown_profile_exits_2(self, tmp_path: Path, config: Path) -> None:
        """`--profile` naming no profile converts nothing and exits 2, naming those
        that exist."""
        np.save(tmp_path / "case.npy", self.scores())
        done = niftidrop(
            "convert", "--config", str(config), "--profile", "monai", "case.npy", cwd=tmp_path
        )
        assert done.returncode == ExitCode.BAD_CONFIG
        assert "--profile: no profile named 'monai' (profiles: nnunet)" in done.stderr
        assert not (tmp_path / "outbox").exists()


class TestConvertPreview:
    def test_preview_beside_the_output(self, make_reference: MakeReference) -> None:
        """--preview: `<stem>.png` is written next to the output."""
        reference = make_reference(shape=(4, 5, 6))
        np.save("a.npy", np.ones((4, 5, 6), np.uint8))
        code = main(["convert", "a.npy", "-o", "out", "--reference", str(reference), "--preview"])
        assert code == ExitCode.OK
        assert Path("out/a.png").read_bytes().startswith(b"\x89PNG")

    def test_a_failed_preview_is_said_and_the_exit_is_0(
        self, make_reference: MakeReference, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An unreadable reference slice: the output is written, `preview_failed` on
        stderr, exit 0 (the input converted)."""
        reference = make_reference("short.nii", shape=(4, 5, 6))
        reference.write_bytes(reference.read_bytes()[:400])
        np.save("a.npy", np.ones((4, 5, 6), np.uint8))
        code = main(["convert", "a.npy", "-o", "out", "--reference", str(reference), "--preview"])
        assert code == ExitCode.OK
        assert Path("out/a.nii.gz").exists()
        assert "a.npy: preview_failed: " in capsys.readouterr().err
