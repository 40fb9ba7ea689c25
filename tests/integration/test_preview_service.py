"""Previews in the running service: beside the output, and never failing an input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from support import ThreadedService, drop_by_rename, files_in, write_reference

from waiting import wait_until

SHAPE = (6, 5, 4)


class TestPreviewInTheService:
    def test_the_png_is_placed_beside_the_output(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """preview = true: `<stem>.png` next to `<stem>.nii.gz`, named in input_converted."""
        service = start_service(root, preview=True)
        labels = np.zeros(SHAPE, np.uint8)
        labels[1:3, 1:3, 1:3] = 1
        drop_by_rename(root / "inbox", "site/case.npy", labels)
        wait_until(lambda: service.events("input_converted"), what="the conversion")
        (event,) = service.events("input_converted")
        assert event["preview"] == str(root / "outbox" / "site" / "case.png")
        assert files_in(root / "outbox") == ["site/case.nii.gz", "site/case.png"]
        with Image.open(root / "outbox" / "site" / "case.png") as image:
            assert image.format == "PNG"
        assert not service.events("preview_failed")

    def test_a_failed_preview_is_logged_and_the_input_converts(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """A reference whose voxels cannot be read: preview_failed (input, error), and the
        input is converted and archived as if previews were off."""
        short = write_reference(root / "library" / "broken.nii", SHAPE)
        short.write_bytes(short.read_bytes()[:400])  # a whole header, hardly any voxels
        service = start_service(root, preview=True)
        drop_by_rename(root / "inbox", "broken.npy", np.ones(SHAPE, np.uint8))
        wait_until(lambda: service.events("input_converted"), what="the conversion")
        (failed,) = service.events("preview_failed")
        assert failed["input"] == "broken.npy"
        assert failed["error"]
        assert failed["log_level"] == "warning"
        assert files_in(root / "outbox") == ["broken.nii.gz"]
        assert files_in(root / "archive") == ["broken.npy"]
        assert not service.events("input_failed")
        image = nib.load(root / "outbox" / "broken.nii.gz")
        assert np.array_equal(np.asarray(image.dataobj), np.ones(SHAPE, np.uint8))
