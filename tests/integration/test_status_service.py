"""The status page of a real service (README: Status page): served while it converts,
kept current, and rendered by a real browser (headless Chromium).

The browser test needs Debian's `chromium`; run as root it installs it with
apt-get when it is missing (`make test` does so first), and it is skipped, with the
reason, only where it cannot be installed. Its screenshot is kept as an artefact
under `$NIFTIDROP_ARTIFACTS` (default: `artifacts/` in the repository), and the
path is printed in the test log.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import urllib.request
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from structlog.testing import capture_logs
from support import (
    ServiceProcess,
    ThreadedService,
    drop_by_rename,
    prediction,
    service_settings,
    write_reference,
)

from niftidrop.cli import main
from waiting import wait_until

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
REPOSITORY = Path(__file__).resolve().parents[2]
HOSTILE = ("<script>.npy", "<img src=x onerror=alert(1)>.npy")
CONVERTED = ("case_1.npy", "case_2.npy", "site/case_3.npy")
REJECTED = {"orphan.npy": "no_reference", "case_small.npy": "shape_mismatch"}


def get_json(port: int, path: str = "/api/status") -> dict[str, Any]:
    with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        report: dict[str, Any] = json.loads(response.read())
    return report


def png(width: int, height: int) -> bytes:
    """A real RGB PNG: a gradient, so a thumbnail of it is visibly not blank."""
    rows = b"".join(
        b"\0" + b"".join(bytes((x * 255 // width, y * 255 // height, 128)) for x in range(width))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def fill(root: Path) -> None:
    """Drops for a page with content: conversions (one with a preview beside its output),
    rejections, and hostile names."""
    inbox = root / "inbox"
    (root / "outbox").mkdir(exist_ok=True)
    (root / "outbox" / "case_1.png").write_bytes(png(48, 32))  # there as case_1 finishes
    for number, name in enumerate(CONVERTED):
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        drop_by_rename(inbox, name, prediction(number))
    drop_by_rename(inbox, "orphan.npy", prediction(7))
    drop_by_rename(inbox, "case_small.npy", np.zeros((3, 3, 3), np.uint8))
    for name in HOSTILE:
        drop_by_rename(inbox, name, prediction(9))


def settled(report: dict[str, Any]) -> bool:
    total = len(CONVERTED) + len(REJECTED) + len(HOSTILE)
    return len(report["recent"]) + len(report["failed"]) == total


class TestServedByTheService:
    @pytest.fixture
    def service(self, root: Path) -> Iterator[ThreadedService]:
        """The real service, its status page on a free port, counting again twice a second."""
        settings = service_settings(root, rescan_interval=0.5)
        # Port 0 (any free port) is for tests: the setting itself wants a real port.
        settings = settings.model_copy(update={"metrics_address": "127.0.0.1:0"})
        with capture_logs() as logs:
            running = ThreadedService(settings, logs).start()
            yield running
            if running.thread.is_alive():
                running.stop()

    def test_outcomes_show_as_they_happen(self, root: Path, service: ThreadedService) -> None:
        """Each conversion and rejection of the real service is listed, with its code."""
        fill(root)
        port = service.service.metrics.port
        assert port is not None
        wait_until(lambda: settled(get_json(port)), 60, "every outcome listed")
        report = get_json(port)
        recent = {entry["input"]: entry for entry in report["recent"]}
        assert set(recent) == set(CONVERTED)
        assert recent["case_1.npy"]["preview"] == "/preview/case_1.png"
        assert recent["case_2.npy"]["preview"] is None
        assert recent["site/case_3.npy"]["shape"] == [6, 5, 4]
        failed = {entry["input"]: entry["error"] for entry in report["failed"]}
        for name, code in REJECTED.items():
            assert failed[name] == code
        assert set(HOSTILE) <= set(failed)
        with _OPENER.open(f"http://127.0.0.1:{port}/preview/case_1.png") as response:
            assert response.read() == png(48, 32)

    def test_counts_agree_with_status(
        self, root: Path, service: ThreadedService, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Once the service is idle, the page's counts are those `niftidrop status` walks."""
        fill(root)
        port = service.service.metrics.port
        assert port is not None
        wait_until(lambda: settled(get_json(port)), 60, "every outcome listed")
        assert main(["status", "--json", "--root", str(root)]) == 0
        walked = json.loads(capsys.readouterr().out)["counts"]
        wait_until(lambda: get_json(port)["counts"] == walked, 30, f"counts {walked}")

    def test_retry_by_another_process_is_seen(
        self, root: Path, service: ThreadedService, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`niftidrop retry` after the reference arrives: the input leaves the failed
        list (the recount) and shows as converted."""
        drop_by_rename(root / "inbox", "orphan.npy", prediction(3))
        port = service.service.metrics.port
        assert port is not None
        wait_until(lambda: get_json(port)["failed"], 60, "orphan failed")
        write_reference(root / "library" / "orphan.nii.gz")
        assert main(["retry", "orphan.npy", "--root", str(root)]) == 0
        wait_until(
            lambda: [entry["input"] for entry in get_json(port)["recent"]] == ["orphan.npy"],
            60,
            "orphan converted",
        )
        wait_until(lambda: get_json(port)["failed"] == [], 30, "failed list emptied")
        assert get_json(port)["counts"]["failed"] == 0


# In a real browser.


def chromium() -> str:
    """The chromium command; installed with apt-get when missing and run as root."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed, and installing it needs root and apt-get")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
        if done.returncode != 0:
            pytest.skip(f"chromium could not be installed ({' '.join(command)}): {done.stderr}")
    return shutil.which("chromium") or pytest.skip("apt-get installed no chromium command")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Dom(HTMLParser):
    """The elements (tag, attributes) of a dumped DOM and the text of each table cell."""

    def __init__(self, document: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None
        self.feed(document)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def tags(self, name: str) -> list[dict[str, str | None]]:
        return [attrs for tag, attrs in self.elements if tag == name]


@pytest.mark.timeout(900)  # installing chromium, where it is missing, takes minutes
class TestInABrowser:
    def test_chromium_renders_the_page(
        self, root: Path, start_process: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Headless Chromium shows every entry, the hostile names as text, the thumbnail;
        its screenshot is not blank (and is kept as an artefact)."""
        browser = chromium()
        port = free_port()
        service: ServiceProcess = start_process(
            root, "--metrics-address", f"127.0.0.1:{port}", "--settle-seconds", "0.2"
        )
        service.wait_ready()
        fill(root)
        wait_until(lambda: settled(get_json(port)), 60, "every outcome listed")
        profile = tmp_path / "chromium-profile"
        command = [
            browser,
            "--headless",
            "--no-sandbox",  # root in CI: chromium's sandbox refuses to start as root
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--window-size=1280,1000",
            "--hide-scrollbars",
        ]
        url = f"http://127.0.0.1:{port}/"
        dumped = subprocess.run(
            [*command, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
        )
        dom = Dom(dumped.stdout)
        for name in (*CONVERTED, *REJECTED, *HOSTILE):
            assert name in dom.cells, f"{name} not on the page"
        assert set(REJECTED.values()) <= set(dom.cells)
        assert dom.tags("script") == []  # neither ours nor a hostile name's
        [thumbnail] = dom.tags("img")  # the preview, and no element made of a name
        assert thumbnail["src"] == "/preview/case_1.png"
        assert dom.tags("meta")[1] == {"http-equiv": "refresh", "content": "5"}

        artefacts = Path(os.environ.get("NIFTIDROP_ARTIFACTS", REPOSITORY / "artifacts"))
        artefacts.mkdir(parents=True, exist_ok=True)
        screenshot = artefacts / "status-page.png"
        screenshot.unlink(missing_ok=True)
        subprocess.run(
            [*command, f"--screenshot={screenshot}", url],
            capture_output=True,
            timeout=120,
            check=True,
        )
        with capsys.disabled():
            print(f"\nstatus page screenshot: {screenshot}")
        pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(screenshot))).astype(np.float64)
        assert pixels.shape[:2] == (1000, 1280)
        assert pixels.std() > 5, "the screenshot is blank"
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 16
