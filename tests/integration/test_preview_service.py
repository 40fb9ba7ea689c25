"""Previews in the running service: beside the output, and never failing an input."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from structlog.testing import capture_logs
from support import (
    ThreadedService,
    drop_by_rename,
    files_in,
    service_settings,
    write_reference,
)

from waiting import wait_until

SHAPE = (6, 5, 4)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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

    def test_the_status_page_shows_the_real_preview(self, root: Path) -> None:
        """With the status page on, the converted input's thumbnail is the PNG written."""
        settings = service_settings(root, preview=True)
        settings = settings.model_copy(update={"metrics_address": "127.0.0.1:0"})
        with capture_logs() as logs:
            service = ThreadedService(settings, logs).start()
            try:
                labels = np.zeros(SHAPE, np.uint8)
                labels[2:4, 2:4, 1:3] = 2
                drop_by_rename(root / "inbox", "case_7.npy", labels)
                wait_until(lambda: service.events("input_converted"), what="the conversion")
                port = service.service.metrics.port
                url = f"http://127.0.0.1:{port}"
                with _OPENER.open(f"{url}/api/status", timeout=10) as response:
                    (entry,) = json.loads(response.read())["recent"]
                assert entry["preview"] == "/preview/case_7.png"
                with _OPENER.open(url + entry["preview"], timeout=10) as response:
                    served = response.read()
                assert served == (root / "outbox" / "case_7.png").read_bytes()
            finally:
                service.stop()
