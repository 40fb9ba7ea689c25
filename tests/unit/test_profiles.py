"""The profiles in use (README: Configuration, Profiles): effective settings, the choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from niftidrop.profile_rules import PROFILE_KEYS
from niftidrop.profiles import Profiles, UnknownProfile, inbox_relative
from niftidrop.settings import Settings

NNUNET: dict[str, Any] = {
    "name": "nnunet",
    "match": "nnunet/**",
    "axis_order": "zyx",
    "channels": "argmax",
}
MONAI: dict[str, Any] = {"name": "monai", "match": "monai/*.npy", "dtype": "float32"}


def settings_with(*profiles: dict[str, Any], **values: Any) -> Settings:
    return Settings.from_values(profiles=list(profiles), **values)


class TestChoice:
    def test_first_match_wins(self) -> None:
        """An input takes the first profile whose glob fits its relative path."""
        catch_all = {"name": "rest", "match": "**", "compress": False}
        profiles = Profiles(settings_with(NNUNET, catch_all))
        assert profiles.choose("nnunet/a/case.npz")[0] == "nnunet"
        assert profiles.choose("other/case.npz")[0] == "rest"
        assert Profiles(settings_with(catch_all, NNUNET)).choose("nnunet/case.npz")[0] == "rest"

    def test_no_match_takes_the_top_level(self) -> None:
        """An input no profile fits has no profile and the top-level settings."""
        top = settings_with(NNUNET, MONAI)
        assert Profiles(top).choose("case.npz") == (None, top)
        assert Profiles(top).choose("monai/case.npz") == (None, top)  # *.npy only

    def test_effective_settings_are_the_top_level_updated(self) -> None:
        """A profile's settings are the top level's with its keys replaced, and no
        others: a key it does not set keeps the top-level value."""
        top = settings_with(NNUNET, workers=1, npz_key="probabilities", sidecar=True)
        name, effective = Profiles(top).choose("nnunet/case.npz")
        assert name == "nnunet"
        assert (effective.axis_order, effective.channels) == ("zyx", "argmax")
        assert (effective.npz_key, effective.sidecar, effective.workers) == (
            "probabilities",
            True,
            1,
        )
        assert effective.profiles == []
        assert isinstance(effective, Settings)

    def test_effective_settings_are_built_once(self) -> None:
        """Every input of a profile gets the same settings object: built at start."""
        profiles = Profiles(settings_with(NNUNET))
        assert profiles.choose("nnunet/a.npz")[1] is profiles.choose("nnunet/b/c.npz")[1]

    def test_a_profile_may_unset_npz_key(self) -> None:
        """A key set to None (JSON null) in a profile replaces the top-level value."""
        top = settings_with({"name": "p", "match": "**", "npz_key": None}, npz_key="x")
        assert Profiles(top).named("p").npz_key is None

    def test_a_profile_names_its_labels(self, tmp_path: Path) -> None:
        """`labels` in a profile is read as the top-level setting is (here an nnU-Net
        dataset.json): its inputs get that table, the others none."""
        dataset = tmp_path / "dataset.json"
        dataset.write_text('{"labels": {"background": 0, "liver": 1}}')
        top = settings_with({**NNUNET, "labels": str(dataset)})
        assert Profiles(top).choose("nnunet/case.npz")[1].labels == {0: "background", 1: "liver"}
        assert Profiles(top).choose("case.npz")[1].labels is None


class TestNamed:
    def test_named_gives_that_profile(self) -> None:
        """`named` and `pick` with a forced name give that profile, whatever the path."""
        profiles = Profiles(settings_with(NNUNET, MONAI))
        assert profiles.named("monai").dtype == "float32"
        assert profiles.pick("monai", "nnunet/case.npz")[0] == "monai"
        assert profiles.pick(None, "nnunet/case.npz")[0] == "nnunet"

    def test_an_unknown_name_lists_the_profiles(self) -> None:
        """An unknown name says which profiles exist (or that none does)."""
        with pytest.raises(UnknownProfile, match=r"'x' \(profiles: nnunet, monai\)"):
            Profiles(settings_with(NNUNET, MONAI)).named("x")
        with pytest.raises(UnknownProfile, match="none is configured"):
            Profiles(settings_with()).named("x")


class TestReport:
    def test_each_profile_with_its_effective_values(self) -> None:
        """`check` shows each profile's name, match and the value of every key a
        profile may set, as its inputs get them."""
        report = Profiles(settings_with(NNUNET, MONAI, compression_level=2)).report()
        assert [entry["name"] for entry in report] == ["nnunet", "monai"]
        first = report[0]
        assert set(first) == {"name", "match", *PROFILE_KEYS}
        assert first["match"] == "nnunet/**"
        assert (first["axis_order"], first["compression_level"], first["dtype"]) == (
            "zyx",
            2,
            "auto",
        )
        assert report[1]["library"] == ["library"]


class TestInboxRelative:
    def test_in_the_inbox_its_relative_path(self, tmp_path: Path) -> None:
        """A file in the inbox is matched by its path relative to the inbox."""
        inbox = tmp_path / "inbox"
        assert inbox_relative(inbox / "nnunet" / "a.npz", inbox) == "nnunet/a.npz"

    def test_elsewhere_its_file_name(self, tmp_path: Path) -> None:
        """A file outside the inbox is matched by its file name alone."""
        assert inbox_relative(tmp_path / "data" / "a.npz", tmp_path / "inbox") == "a.npz"

    def test_a_relative_path_is_taken_from_the_working_folder(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`inbox/monai/a.npy` typed in the spool's root is a path in the inbox."""
        monkeypatch.chdir(tmp_path)
        relative = inbox_relative(Path("inbox/monai/a.npy"), tmp_path / "inbox")
        assert relative == "monai/a.npy"
