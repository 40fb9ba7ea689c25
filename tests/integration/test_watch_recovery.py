"""Watches that are lost while the service runs (the library folder removed and made
again, or renamed away and replaced) are set again: new references are used."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from support import ThreadedService, drop_by_rename, output_of, prediction, write_reference

from niftidrop.library import ReferenceLibrary
from waiting import wait_until


def place_reference(library: Path, name: str) -> Path:
    """A reference written under a hidden name and renamed in, so it is never read half
    written."""
    hidden = write_reference(library / f".{name}")
    final = library / name
    hidden.rename(final)
    return final


class TestLibraryFolderReplaced:
    @pytest.mark.parametrize("how", ["removed", "renamed away"])
    def test_new_references_are_used(
        self, root: Path, start_service: Callable[..., ThreadedService], how: str
    ) -> None:
        """The library folder removed (or renamed away) and made again while the service
        runs, with no rescan due for an hour: a reference put in the new folder is
        found, and the input waiting for it is converted."""
        service = start_service(
            root, rescan_interval=3600.0, poll_interval=0.2, reference_wait=10.0
        )
        library = root / "library"
        if how == "removed":
            shutil.rmtree(library)
        else:
            library.rename(root / "library.old")
        library.mkdir()
        if how == "renamed away":
            # Nothing reports a folder renamed away: the check before each periodic
            # rescan finds it. Here it is made at once rather than in an hour.
            references = service.service.library
            assert isinstance(references, ReferenceLibrary)
            assert references.renew_watches() == [library]
        drop_by_rename(root / "inbox", "late_1.npy", prediction(1))
        place_reference(library, "late.nii.gz")
        wait_until(lambda: service.events("input_converted"), timeout=30, what="converted")
        assert service.events("input_failed") == []
        (line,) = service.events("input_converted")
        assert line["reference"] == str(library / "late.nii.gz")
        assert (output_of(root, "late_1.npy") == prediction(1)).all()
