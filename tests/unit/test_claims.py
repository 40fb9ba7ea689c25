"""Tests of the spool's folders, lock, owner id and temporaries (README: File protocol)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from niftidrop.claims import (
    Claim,
)
from niftidrop.errors import ConfigError
from niftidrop.names import temp_path_for
from niftidrop.settings import Settings, load_settings
from niftidrop.spool import Spool


class TestSetUp:
    def test_creates_every_folder(self, spool: Spool) -> None:
        """create_folders makes inbox, outbox, archive, failed and the claims folder."""
        for folder in (spool.inbox, spool.outbox, spool.archive_folder, spool.failed_folder):
            assert folder.is_dir()
        assert spool.claims_folder.is_dir()

    def test_a_file_in_place_of_a_folder_is_refused(self, settings: Settings) -> None:
        """A folder setting naming a file stops the start with a message naming it."""
        settings.outbox_dir.parent.mkdir(parents=True, exist_ok=True)
        settings.outbox_dir.write_text("")
        with pytest.raises(ConfigError, match="outbox"):
            Spool(settings).create_folders()

    def test_second_lock_is_refused(self, settings: Settings, spool: Spool) -> None:
        """Two live instances with one name cannot run at once; another name can."""
        spool.lock()
        try:
            with pytest.raises(ConfigError, match="no live instance named"):
                Spool(settings).lock()
            other = Spool(settings.model_copy(update={"instance": "other"}))
            other.lock()
            other.unlock()
        finally:
            spool.unlock()
        again = Spool(settings)
        again.lock()
        again.unlock()


class TestTemporaries:
    """The owner id of a state folder and the temporary files it tells apart."""

    def test_stale_temporaries_are_removed(self, spool: Spool) -> None:
        """This service's hidden .tmp files in outbox, archive, failed and state go."""
        claim = Claim(spool.claims_folder / "token", PurePosixPath("sub/a.npy"))
        stale = [
            temp_path_for(spool.outbox / "sub" / "a.nii.gz", spool.owner_for(claim)),
            temp_path_for(spool.archive_folder / "a.npy", spool.owner_for(claim)),
            temp_path_for(spool.failed_folder / "a.npy.error.json", spool.owner),
            spool.instance_folder / ".heartbeat.json.x3.tmp",
        ]
        kept = [spool.outbox / "a.nii.gz", spool.inbox / ".producer.npy.tmp"]
        for path in stale + kept:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        assert spool.remove_stale_temporaries() == 4
        assert not any(path.exists() for path in stale)
        assert all(path.exists() for path in kept)

    def test_another_services_temporaries_are_left_alone(
        self, spool: Spool, tmp_path: Path
    ) -> None:
        """In a shared outbox, archive or failed a start removes only its own temporaries."""
        other = Spool(load_settings(root=tmp_path, state_dir=tmp_path / "inbox" / ".other"))
        other.create_folders()
        assert other.owner != spool.owner
        theirs = [
            temp_path_for(other.outbox / "b.nii.gz", other.owner),
            temp_path_for(other.archive_folder / "b.npy", f"{other.owner}-token"),
            temp_path_for(other.failed_folder / "b.npy.error.json", other.owner),
            temp_path_for(other.outbox / "c.nii.gz"),  # `niftidrop convert`, no owner
        ]
        mine = temp_path_for(spool.outbox / "a.nii.gz", spool.owner)
        for path in [*theirs, mine]:
            path.write_bytes(b"in flight")
        assert spool.remove_stale_temporaries() == 1
        assert all(path.read_bytes() == b"in flight" for path in theirs)
        assert not mine.exists()

    def test_the_owner_id_is_kept_in_the_state_folder(self, settings: Settings) -> None:
        """Every Spool of one instance has the same id, made once, in its folder."""
        first = Spool(settings)
        first.create_folders()
        assert Spool(settings).owner == first.owner
        assert (first.instance_folder / "owner").read_text().strip() == first.owner


class TestRememberConversions:
    @pytest.mark.parametrize(
        ("top", "profile", "remembered"),
        [
            ("overwrite", None, False),
            ("rename", None, True),
            ("overwrite", "fail", True),
            ("overwrite", "overwrite", False),
        ],
    )
    def test_a_profile_on_conflict_counts(
        self, tmp_path: Path, top: str, profile: str | None, remembered: bool
    ) -> None:
        """Conversions are journaled (so a redo after a crash finds its outputs)
        when the top level or any profile names outputs by rename or fail."""
        table: dict[str, object] = {"name": "p", "match": "p/**"}
        if profile is not None:
            table["on_conflict"] = profile
        settings = load_settings(root=tmp_path, on_conflict=top, profiles=[table])
        assert Spool(settings).remember_conversions is remembered
