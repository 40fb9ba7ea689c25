"""Tests for niftidrop.status_page: the page, `/api/status` and previews, over real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from http import HTTPStatus
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_status_board import converted, failed

from niftidrop.metrics import Metrics
from niftidrop.spool import Spool
from niftidrop.status_board import StatusBoard
from niftidrop.status_page import StatusPage, render

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Elements(HTMLParser):
    """The start tags of a document and its text, as a browser's parser splits them."""

    def __init__(self, document: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.feed(document)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture
def board(spool: Spool) -> StatusBoard:
    instance = StatusBoard(spool, quick_interval=3600, full_interval=3600)
    instance.load()
    return instance


@pytest.fixture
def page(board: StatusBoard) -> StatusPage:
    return StatusPage(board)


@pytest.fixture
def port(page: StatusPage) -> Iterator[int]:
    """The page served by a real metrics server on a free port."""
    metrics = Metrics()
    metrics.serve("127.0.0.1:0", lambda: True, page.respond)
    assert metrics.port is not None
    yield metrics.port
    metrics.close()


def get(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET `path` (sent as it is, not re-encoded)."""
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


def status_with(input_name: str, message: str) -> dict[str, object]:
    """An `/api/status` object with one conversion and one failure named `input_name`."""
    counts = {"inbox": 0, "claimed": 0, "outbox": 1, "archive": 1, "failed": 1}
    return {
        **counts,
        "counts": counts,
        "heartbeat_age": 1.0,
        "state": "running",
        "instances": [
            {"name": input_name, "host": "h", "pid": 1, "state": "running"}
            | {"heartbeat_age": 1.0, "claimed": 0}
        ],
        "recent": [
            {
                "input": input_name,
                "reference": f"/lib/{input_name}.nii.gz",
                "rule": "reference_prefix",
                "shape": [2, 3],
                "dtype_in": "int64",
                "dtype_out": "uint8",
                "seconds": 0.5,
                "converted_at": "2026-01-01T00:00:00Z",
                "preview": f"/preview/{input_name}.png",
            }
        ],
        "failed": [
            {
                "name": input_name,
                "input": input_name,
                "error": "corrupt",
                "message": message,
                "failed_at": "2026-01-01T00:00:00Z",
            }
        ],
    }


class TestPage:
    def test_page_shows_counts_conversions_and_failures(
        self, spool: Spool, board: StatusBoard, page: StatusPage
    ) -> None:
        """The page names each recent conversion and failed input, with its code."""
        board.record(converted(spool, "case_1"))
        board.record(failed(spool, "orphan.npy"))
        status, body, content_type = page.respond("/") or (0, b"", "")
        assert status == HTTPStatus.OK
        assert content_type == "text/html; charset=utf-8"
        text = "".join(Elements(body.decode()).text)
        for expected in (
            "case_1.npy",
            "orphan.npy",
            "corrupt",
            "orphan.npy: bad",
            "2\u00d73\u00d74",
        ):
            assert expected in text

    def test_page_refreshes_itself_without_script(self, page: StatusPage) -> None:
        """A meta refresh reloads it; it has no script and loads nothing from elsewhere."""
        body = (page.respond("/") or (0, b"", ""))[1].decode()
        elements = Elements(body)
        assert 'http-equiv=refresh content="5"' in body
        assert "script" not in elements.tags
        assert "default-src 'none'" in body
        assert "http://" not in body
        assert "https://" not in body

    def test_a_hostile_name_is_text(self) -> None:
        """`<script>.npy` and markup in a message render as text, never as elements."""
        document = render(status_with("<script>.npy", '<img src=x onerror="alert(1)">'))
        elements = Elements(document)
        assert "script" not in elements.tags
        assert elements.tags.count("img") == 1  # the preview thumbnail, nothing else
        assert "<script>.npy" in "".join(elements.text)
        assert '<img src=x onerror="alert(1)">' in "".join(elements.text)

    @settings(max_examples=150, deadline=None)
    @given(name=st.text(min_size=1, max_size=40), message=st.text(max_size=80))
    def test_any_name_leaves_the_markup_alone(self, name: str, message: str) -> None:
        """Whatever the names and messages, the page has the same elements as a plain one."""
        plain = Elements(render(status_with("case.npy", "bad"))).tags
        assert Elements(render(status_with(name, message))).tags == plain

    def test_an_empty_service_says_so(self, page: StatusPage) -> None:
        """No heartbeat, conversion or failure: each section says there is none."""
        text = "".join(Elements((page.respond("/") or (0, b"", ""))[1].decode()).text)
        assert "No heartbeat in the state folder." in text
        assert "No conversion since the service started." in text
        assert "No failed input." in text

    def test_folders_not_counted_yet_show_a_dash(self) -> None:
        """Before the first count a folder shows a dash, not a made-up zero."""
        status = status_with("case.npy", "bad")
        status["counts"] = dict.fromkeys(("inbox", "claimed", "outbox", "archive", "failed"))
        document = render(status)
        assert "<li id=count-archive><b>&ndash;</b>archive</li>" in document


class TestApi:
    def test_api_is_the_status_object_with_lists(
        self, spool: Spool, board: StatusBoard, port: int
    ) -> None:
        """`/api/status`: `status --json`'s keys, with `recent` and `failed` as lists."""
        spool.write_heartbeat({"pid": 1, "host": "here"})
        board.record(converted(spool, "a", preview=True))
        board.record(failed(spool, "b.npy"))
        status, content_type, body = get(port, "/api/status")
        assert (status, content_type) == (200, "application/json")
        report = json.loads(body)
        assert report["counts"] == {
            "inbox": 0,
            "claimed": 0,
            "outbox": 2,
            "archive": 1,
            "failed": 1,
        }
        assert report["archive"] == 1
        assert [entry["input"] for entry in report["recent"]] == ["a.npy"]
        assert report["recent"][0]["preview"] == "/preview/a.png"
        assert [entry["error"] for entry in report["failed"]] == ["corrupt"]
        assert [item["host"] for item in report["instances"]] == ["here"]

    def test_other_paths_are_not_pages(self, page: StatusPage) -> None:
        """Paths the page does not own are left to the server (404 there)."""
        assert page.respond("/index.html") is None
        assert page.respond("/api") is None


class TestPreview:
    @pytest.fixture
    def recorded(self, spool: Spool, board: StatusBoard) -> Path:
        board.record(converted(spool, "site/case a", preview=True))
        return spool.outbox / "site" / "case a.png"

    def test_a_recorded_preview_is_served(self, recorded: Path, port: int) -> None:
        """The preview of a recorded conversion is served as a PNG by its URL."""
        assert get(port, "/preview/site/case%20a.png") == (200, "image/png", b"png")
        assert get(port, "/preview/site%2Fcase%20a.png")[0] == 200  # the same name

    @pytest.mark.parametrize(
        "path",
        [
            "/preview/../outbox/site/case%20a.png",
            "/preview/site/../site/case%20a.png",
            "/preview/%2E%2E%2Foutbox%2Fsite%2Fcase%20a.png",
            "/preview/..%2F..%2F..%2Fetc%2Fpasswd",
            "/preview//etc/passwd",
            "/preview/%2Fetc%2Fpasswd",
            "/preview/site/",
            "/preview/",
        ],
    )
    def test_no_path_reaches_a_file_by_traversal(
        self, recorded: Path, port: int, path: str
    ) -> None:
        """`..`, encoded slashes and absolute paths find nothing: names are looked up."""
        assert get(port, path)[0] == 404

    def test_a_file_swapped_for_a_symlink_is_not_followed(
        self, recorded: Path, port: int, tmp_path: Path
    ) -> None:
        """A recorded preview replaced by a symlink (to a secret) is not served."""
        secret = tmp_path / "secret.png"
        secret.write_bytes(b"secret")
        recorded.unlink()
        recorded.symlink_to(secret)
        assert get(port, "/preview/site/case%20a.png")[0] == 404

    def test_a_folder_swapped_for_a_symlink_is_not_followed(
        self, recorded: Path, port: int, tmp_path: Path
    ) -> None:
        """A folder of the outbox replaced by a link to elsewhere serves nothing."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "case a.png").write_bytes(b"secret")
        recorded.parent.rename(tmp_path / "moved")
        recorded.parent.symlink_to(elsewhere)
        assert get(port, "/preview/site/case%20a.png")[0] == 404

    def test_a_removed_preview_is_404(self, recorded: Path, port: int) -> None:
        """A preview removed since it was recorded is 404, not an error."""
        recorded.unlink()
        assert get(port, "/preview/site/case%20a.png")[0] == 404


class TestReadOnly:
    def test_requests_change_no_file(self, spool: Spool, board: StatusBoard, port: int) -> None:
        """Every route, asked many times, leaves every file of the spool as it was."""
        board.record(converted(spool, "a", preview=True))
        board.record(failed(spool, "b.npy"))
        root = spool.inbox.parent

        def tree() -> dict[str, tuple[int, int]]:
            return {
                str(path): (path.lstat().st_mtime_ns, path.lstat().st_size)
                for path in root.rglob("*")
            }

        before = tree()
        for _ in range(5):
            for path in ("/", "/api/status", "/preview/a.png", "/preview/x", "/metrics"):
                get(port, path)
        assert tree() == before
