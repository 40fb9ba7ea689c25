"""The status page (README: Status page): `/`, `/api/status` and `/preview/<name>`.

Served by the metrics server (`niftidrop.metrics`) beside `/metrics`. Everything
comes from the service's memory (`niftidrop.status_board`) and its heartbeat file:
no request lists a folder or changes a file. The page is one HTML document with
inline CSS and no script; it reloads itself (a meta refresh), and its content
security policy lets it load nothing but its own previews. Every name and message
is escaped (`html.escape`), so a file named `<script>.npy` shows as text.

A preview is served only under a name the service recorded for an output it
wrote: the name is looked up, never joined to a folder, and the file is opened
without following a symlink and only when it lies in the outbox.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping, Sequence
from html import escape
from http import HTTPStatus
from pathlib import PurePosixPath
from typing import Any, Final
from urllib.parse import quote, unquote

from niftidrop.observers import is_within
from niftidrop.status import status_report
from niftidrop.status_board import StatusBoard
from niftidrop.version import __version__

PAGE_PATH: Final = "/"
API_PATH: Final = "/api/status"
PREVIEW_PREFIX: Final = "/preview/"
REFRESH_SECONDS: Final = 5
MAX_PREVIEW_BYTES: Final = 32 * 1024 * 1024
HTML_TYPE: Final = "text/html; charset=utf-8"
JSON_TYPE: Final = "application/json"
PNG_TYPE: Final = "image/png"
DASH: Final = "&ndash;"  # what a missing value shows

Reply = tuple[HTTPStatus, bytes, str]

_CSS: Final = """
:root{color-scheme:light dark;--fg:#1d2430;--muted:#5d6775;--bg:#f6f7f9;--card:#fff;
--line:#e2e5ea;--accent:#2f6fde;--bad:#c23b32}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ee;--muted:#9aa4b2;--bg:#14171c;
--card:#1d2128;--line:#2c323b;--accent:#7aa7ff;--bad:#ff7b72}}
*{box-sizing:border-box}
body{margin:0;padding:1.5rem;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;
color:var(--fg);background:var(--bg)}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:.4rem 1rem;margin-bottom:1rem}
h1{font-size:1.4rem;margin:0}h2{font-size:1.05rem;margin:1.6rem 0 .5rem}
.muted,caption{color:var(--muted)}
.counts{display:flex;flex-wrap:wrap;gap:.75rem;padding:0;margin:0;list-style:none}
.counts li{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:.6rem 1rem;min-width:7.5rem}
.counts b{display:block;font-size:1.5rem;font-variant-numeric:tabular-nums}
.counts .bad b{color:var(--bad)}
table{width:100%;border-collapse:collapse;background:var(--card);border:1px solid var(--line);
border-radius:8px;overflow:hidden}
caption{text-align:left;padding:.3rem 0}
th,td{text-align:left;padding:.4rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:var(--muted);font-size:.85em}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
.code{color:var(--bad);font-weight:600}
img{display:block;max-width:120px;max-height:120px;border-radius:4px;background:#000}
.message{max-width:48rem;word-break:break-word}
.empty{color:var(--muted);padding:.6rem}
time{white-space:nowrap}
"""


class StatusPage:
    """The page's routes, answered from `board` (see the module docstring)."""

    def __init__(self, board: StatusBoard) -> None:
        self.board = board
        self.spool = board.spool

    def __repr__(self) -> str:
        return f"StatusPage({self.board!r})"

    def respond(self, path: str) -> Reply | None:
        """The reply to a GET of `path` (its query removed), or None: not a page path."""
        if path == PAGE_PATH:
            return HTTPStatus.OK, render(self.status()).encode(), HTML_TYPE
        if path == API_PATH:
            body = json.dumps(self.status(), default=str).encode()
            return HTTPStatus.OK, body, JSON_TYPE
        if path.startswith(PREVIEW_PREFIX):
            data = self.preview(unquote(path.removeprefix(PREVIEW_PREFIX)))
            if data is None:
                return HTTPStatus.NOT_FOUND, b"no such preview\n", "text/plain; charset=utf-8"
            return HTTPStatus.OK, data, PNG_TYPE
        return None

    def status(self) -> dict[str, Any]:
        """The `/api/status` object: `status --json`'s with `recent` and `failed`, the
        lists (the count of failed inputs stays in `counts`)."""
        snapshot = self.board.snapshot()
        recent = [
            {**entry, "preview": None if entry["preview"] is None else preview_url(entry)}
            for entry in snapshot.recent
        ]
        report = status_report(self.spool, snapshot.counts)
        return {**report, "recent": recent, "failed": snapshot.failed}

    def preview(self, name: str) -> bytes | None:
        """The bytes of the preview recorded as `name`, None when there is none."""
        path = self.board.preview(name)
        if path is None:
            return None
        outbox = os.path.realpath(self.spool.outbox)
        if not is_within(os.path.realpath(path.parent), outbox):
            return None  # a folder of the outbox was replaced by a link elsewhere
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_PREVIEW_BYTES:
                return None
            return handle.read(MAX_PREVIEW_BYTES)


def preview_url(entry: Mapping[str, Any]) -> str:
    """The URL of a recent conversion's preview (its name, percent-encoded)."""
    return PREVIEW_PREFIX + quote(str(entry["preview"]), safe="/")


# The HTML.


def render(status: Mapping[str, Any]) -> str:
    """The status page for a `/api/status` object."""
    instances = status["instances"]
    title = instances[0]["name"] if instances else "no service"
    return "".join(
        [
            "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
            f'<meta http-equiv=refresh content="{REFRESH_SECONDS}">',
            '<meta name=viewport content="width=device-width,initial-scale=1">',
            # Nothing but its own previews may load: no fonts or scripts from elsewhere.
            "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; "
            "img-src 'self'; style-src 'unsafe-inline'\">",
            f"<title>niftidrop · {_text(title)}</title><style>{_CSS}</style></head><body>",
            "<header><h1>niftidrop</h1>",
            f"<span class=muted>{_text(__version__)} · refreshes every {REFRESH_SECONDS} s"
            "</span></header>",
            _counts(status),
            _instances(instances),
            _recent(status["recent"]),
            _failed(status["failed"], status["counts"].get("failed")),
            "</body></html>",
        ]
    )


def _text(value: object) -> str:
    return escape(str(value), quote=True)


def _counts(status: Mapping[str, Any]) -> str:
    items = []
    for folder in ("inbox", "claimed", "outbox", "archive", "failed"):
        count = status["counts"].get(folder)
        css = " class=bad" if folder == "failed" and count else ""
        shown = DASH if count is None else f"{int(count):,}"
        items.append(f"<li{css} id=count-{folder}><b>{shown}</b>{folder}</li>")
    return "<section><h2>Folders</h2><ul class=counts>" + "".join(items) + "</ul></section>"


def _table(section: str, heading: str, columns: Sequence[str], rows: list[str], empty: str) -> str:
    head = "".join(f"<th scope=col>{column}</th>" for column in columns)
    body = "".join(rows) or f'<tr><td class=empty colspan="{len(columns)}">{empty}</td></tr>'
    return (
        f"<section id={section}><h2>{heading}</h2><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></section>"
    )


def _instances(instances: list[dict[str, Any]]) -> str:
    rows = [
        "<tr>"
        f"<td><code>{_text(item['name'])}</code></td><td>{_text(item['host'])}</td>"
        f"<td class=num>{_text(item['pid'])}</td><td>{_text(item['state'])}</td>"
        f"<td class=num>{_age(item['heartbeat_age'])}</td>"
        f"<td class=num>{_text(item['claimed'])}</td></tr>"
        for item in instances
    ]
    columns = ("name", "host", "pid", "state", "heartbeat", "claimed")
    return _table("instances", "Instances", columns, rows, "No heartbeat in the state folder.")


def _age(age: object) -> str:
    return DASH if not isinstance(age, int | float) else f"{age:.1f} s ago"


def _recent(recent: list[dict[str, Any]]) -> str:
    rows = []
    for entry in recent:
        reference = entry.get("reference")
        shown_reference = (
            DASH
            if reference is None
            else f'<code title="{_text(reference)}">{_text(PurePosixPath(reference).name)}</code>'
        )
        shape = "&times;".join(_text(size) for size in entry.get("shape") or [])
        preview = entry.get("preview")
        thumbnail = (
            ""
            if preview is None
            else f'<a href="{_text(preview)}"><img src="{_text(preview)}" loading=lazy '
            f'alt="preview of {_text(entry.get("input"))}"></a>'
        )
        rows.append(
            "<tr>"
            f"<td>{_time(entry.get('converted_at'))}</td>"
            f"<td><code>{_text(entry.get('input'))}</code></td>"
            f"<td>{shown_reference}</td><td>{_text(entry.get('rule'))}</td>"
            f"<td>{shape}</td>"
            f"<td>{_text(entry.get('dtype_in'))} → {_text(entry.get('dtype_out'))}</td>"
            f"<td class=num>{_seconds(entry.get('seconds'))}</td><td>{thumbnail}</td></tr>"
        )
    columns = ("time (UTC)", "input", "reference", "rule", "shape", "dtype", "seconds", "preview")
    heading = "Recent conversions"
    return _table("recent", heading, columns, rows, "No conversion since the service started.")


def _seconds(seconds: object) -> str:
    return _text(seconds) if not isinstance(seconds, int | float) else f"{seconds:.3f}"


def _time(iso: object) -> str:
    """A UTC ISO 8601 time as "2026-12-02 04:10:11" (the full time in its tag)."""
    text = str(iso or "")
    shown = text[:19].replace("T", " ")
    return f'<time datetime="{_text(text)}">{_text(shown)}</time>'


def _failed(failed: list[dict[str, Any]], total: object) -> str:
    rows = [
        "<tr>"
        f"<td>{_time(entry['failed_at'])}</td><td><code>{_text(entry['input'])}</code></td>"
        f"<td class=code>{_text(entry['error'])}</td>"
        f"<td class=message>{_text(entry['message'])}</td></tr>"
        for entry in failed
    ]
    heading = "Failed inputs"
    if isinstance(total, int) and total > len(failed):
        heading += f" <span class=muted>(the newest {len(failed):,} of {total:,})</span>"
    columns = ("time (UTC)", "input", "error", "message")
    return _table("failed", heading, columns, rows, "No failed input.")
