"""`niftidrop run --once` as a real process: what its JSON log says of inputs it could not
convert (README: Running the service, Logs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from support import prediction, save_npy


def run_once(root: Path) -> tuple[int, list[dict[str, Any]]]:
    """Exit code and the JSON log lines of `niftidrop run --once` on `root`."""
    fast = ["--log-format", "json", "--settle-seconds", "0.3", "--no-fsync", "--workers", "1"]
    finished = subprocess.run(
        [sys.executable, "-m", "niftidrop", "run", "--once", "--root", str(root), *fast],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    return finished.returncode, lines


def events(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == name]


def truncated_npy(path: Path) -> Path:
    """A real `.npy` cut to half its bytes, as an interrupted copy leaves it."""
    save_npy(path, prediction(1))
    os.truncate(path, path.stat().st_size // 2)
    return path


class TestTruncatedInput:
    def test_an_incomplete_file_is_counted_and_explained(self, root: Path) -> None:
        """A truncated file written just now stays in the inbox: `input_incomplete`
        says why, `service_stopped` counts it as `incomplete`, the exit code is 1."""
        save_npy(root / "inbox" / "case_0.npy", prediction(0))
        cut = truncated_npy(root / "inbox" / "cut.npy")
        code, lines = run_once(root)
        assert code == 1
        (incomplete,) = events(lines, "input_incomplete")
        assert incomplete["input"] == "cut.npy"
        size = cut.stat().st_size
        assert incomplete["reason"].startswith(f"incomplete: {size} bytes, fewer than a whole")
        assert lines[-1]["event"] == "service_stopped"
        counts = {key: lines[-1][key] for key in ("converted", "failed", "deferred", "incomplete")}
        assert counts == {"converted": 1, "failed": 0, "deferred": 0, "incomplete": 1}
        assert cut.exists()

    def test_a_file_truncated_long_ago_fails_as_truncated(self, root: Path) -> None:
        """A truncated file unchanged for longer than incomplete_timeout fails as
        `truncated` and is counted in `failed`."""
        cut = truncated_npy(root / "inbox" / "cut.npy")
        hours_ago = time.time() - 2 * 3600
        os.utime(cut, (hours_ago, hours_ago))
        code, lines = run_once(root)
        assert code == 1
        (failed,) = events(lines, "input_failed")
        assert (failed["input"], failed["error"]) == ("cut.npy", "truncated")
        assert events(lines, "input_incomplete") == []
        assert (lines[-1]["failed"], lines[-1]["incomplete"]) == (1, 0)
        assert (root / "failed" / "cut.npy").exists()
