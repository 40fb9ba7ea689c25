"""Tests of `niftidrop match`: which reference each name resolves to, and the exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from niftidrop.cli import ExitCode, main
from real_command import niftidrop


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A library folder with a plain reference, nnU-Net channels and a duplicated key."""
    folder = tmp_path / "library"
    for name in (
        "case001.nii.gz",
        "case002_0000.nii.gz",
        "case002_0001.nii.gz",
        "a/dup.nii",
        "b/dup.nii",
    ):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    return folder


def run_match(library: Path, *names: str, json_output: bool = False) -> int:
    argv = ["match", "--library", str(library), *names]
    return main([*argv, "--json"] if json_output else argv)


class TestHumanOutput:
    def test_reference_rule_and_other_candidates(
        self, library: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Each name gets its reference, its rule, and the other candidates; exit 0."""
        assert run_match(library, "case001_pred.npz", "case002.npy") == ExitCode.OK
        lines = capsys.readouterr().out.splitlines()
        assert lines == [
            f"case001_pred.npz: {library / 'case001.nii.gz'} "
            "(rule reference_prefix, key case001_pred)",
            f"case002.npy: {library / 'case002_0000.nii.gz'} (rule input_prefix, key case002)",
            f"    other candidate: {library / 'case002_0001.nii.gz'}",
        ]

    def test_missing_reference_exits_1(
        self, library: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A name without a reference is reported with its error code, and the exit is 1."""
        assert run_match(library, "case001.npz", "case10.npz") == ExitCode.FAILED
        out = capsys.readouterr().out
        assert (
            "case10.npz: no_reference\n    case10.npz: expected a reference keyed 'case10'" in out
        )
        assert f"case001.npz: {library / 'case001.nii.gz'} (rule exact" in out

    def test_ambiguous_lists_candidates_and_exits_1(
        self, library: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An ambiguous key is a failure that lists every candidate."""
        assert run_match(library, "dup_seg.npz") == ExitCode.FAILED
        out = capsys.readouterr().out
        assert "dup_seg.npz: ambiguous_reference\n" in out
        assert f"    candidate: {library / 'a' / 'dup.nii'}" in out
        assert f"    candidate: {library / 'b' / 'dup.nii'}" in out


class TestJsonOutput:
    def test_one_object_per_name(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints one parseable object per name, errors included."""
        assert run_match(library, "case002.npz", "dup.npz", json_output=True) == ExitCode.FAILED
        first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
        assert first == {
            "name": "case002.npz",
            "key": "case002",
            "reference": str(library / "case002_0000.nii.gz"),
            "rule": "input_prefix",
            "candidates": [
                str(library / "case002_0000.nii.gz"),
                str(library / "case002_0001.nii.gz"),
            ],
            "error": None,
            "message": None,
            "profile": None,
        }
        assert second["error"] == "ambiguous_reference"
        assert second["reference"] is None
        assert sorted(second["candidates"]) == [
            str(library / "a" / "dup.nii"),
            str(library / "b" / "dup.nii"),
        ]


class TestSettings:
    def test_matching_settings_apply(
        self, library: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Flags such as --separators and --key-pattern change how names match."""
        assert run_match(library, "case001-pred.npz", "--separators", "_") == ExitCode.FAILED
        assert "no_reference" in capsys.readouterr().out
        code = run_match(library, "case002_seg.npz", "--key-pattern", r"(?P<key>case\d+)")
        assert code == ExitCode.FAILED  # two channels share the pattern key: ambiguous
        assert "ambiguous_reference" in capsys.readouterr().out

    def test_bad_key_pattern_is_a_config_error(self, library: Path) -> None:
        """An invalid key_pattern stops the command as a configuration error."""
        assert run_match(library, "x.npz", "--key-pattern", "no-group") == ExitCode.BAD_CONFIG


class TestMissingLibrary:
    def test_a_library_that_does_not_exist_is_an_error(
        self, library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A library folder that does not exist is named in an error, exit 2, before
        any name is matched (also when another library folder exists); none is made."""
        missing = tmp_path / "nonexistent"
        argv = ["match", "--library", str(library), "--library", str(missing), "case001.npz"]
        assert main(argv) == ExitCode.BAD_CONFIG
        out, err = capsys.readouterr()
        assert out == ""
        assert f"niftidrop: error: library: {missing} does not exist" in err
        assert str(library) not in err
        assert not missing.exists()

    def test_a_library_that_is_a_file_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A library path that is a file is not a folder: exit 2, named."""
        (tmp_path / "scans").write_text("a file")
        assert run_match(tmp_path / "scans", "case001.npz") == ExitCode.BAD_CONFIG
        assert f"library: {tmp_path / 'scans'} is not a folder" in capsys.readouterr().err

    def test_the_real_command(self, tmp_path: Path) -> None:
        """`niftidrop match --library /nonexistent NAME`: exit 2, the folder named."""
        result = niftidrop("match", "--library", str(tmp_path / "nonexistent"), "case.npz")
        assert result.returncode == ExitCode.BAD_CONFIG
        assert f"library: {tmp_path / 'nonexistent'} does not exist" in result.stderr


class TestProfiles:
    """Profiles (README: Configuration, Profiles): a name relative to the inbox takes
    the profile its path falls under, `--profile` forces one."""

    @pytest.fixture
    def config(self, tmp_path: Path, library: Path) -> Path:
        """Settings with a profile whose own library holds `case001_0000`."""
        (tmp_path / "nnunet_refs").mkdir()
        (tmp_path / "nnunet_refs" / "case001_0000.nii.gz").touch()
        toml = tmp_path / "niftidrop.toml"
        toml.write_text(
            f'root = "{tmp_path}"\nlibrary = ["{library}"]\n'
            '[[profiles]]\nname = "nnunet"\nmatch = "nnunet/**"\nlibrary = ["nnunet_refs"]\n'
        )
        return toml

    def test_the_path_chooses_the_profile(self, tmp_path: Path, config: Path) -> None:
        """`nnunet/case001.npz` matches in the profile's library and says so;
        `case001.npz` in the top level's; an absolute path in the inbox counts as
        its relative path (the real command)."""
        inbox_path = str(tmp_path / "inbox" / "nnunet" / "case001.npz")
        done = niftidrop(
            "match", "--config", str(config), "nnunet/case001.npz", "case001.npz", inbox_path
        )
        assert done.returncode == 0, done.stderr
        profiled, top, absolute = done.stdout.splitlines()
        own = tmp_path / "nnunet_refs" / "case001_0000.nii.gz"
        assert profiled == (
            f"nnunet/case001.npz: {own} (rule input_prefix, key case001, profile nnunet)"
        )
        assert (
            top
            == f"case001.npz: {tmp_path / 'library' / 'case001.nii.gz'} (rule exact, key case001)"
        )
        assert absolute.endswith("(rule input_prefix, key case001, profile nnunet)")

    def test_profile_forces_one(self, config: Path) -> None:
        """`--profile nnunet` applies it to any name; --json carries the profile."""
        done = niftidrop(
            "match", "--config", str(config), "--profile", "nnunet", "case001.npz", "--json"
        )
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout)
        assert (found["profile"], found["rule"]) == ("nnunet", "input_prefix")

    def test_an_unknown_profile_exits_2_naming_the_profiles(self, config: Path) -> None:
        """`--profile` naming no profile is a usage error that lists those that exist."""
        done = niftidrop("match", "--config", str(config), "--profile", "nnunte", "case001.npz")
        assert done.returncode == ExitCode.BAD_CONFIG
        assert done.stdout == ""
        assert "--profile: no profile named 'nnunte' (profiles: nnunet)" in done.stderr
