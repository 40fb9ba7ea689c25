"""An input the service may not read (README: File protocol): retried as transient, converted once
readable; never left to time out as truncated. Run by a service without the
capabilities that let root read any file, so permissions apply as to any user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from support import prediction, save_npy

from waiting import wait_until


def as_a_plain_user(command: list[str]) -> list[str]:
    """`command` without the capabilities that let root read any file (setpriv)."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]


class TestUnreadableInput:
    def test_converted_once_readable(self, root: Path) -> None:
        """Mode 000: input_retrying (permission), not truncated; converted after chmod."""
        environment = {**os.environ, "NIFTIDROP_LOG_FORMAT": "json"}
        command = [sys.executable, "-m", "niftidrop", "run", "--root", str(root)]
        command += ["--settle-seconds", "0.2", "--incomplete-timeout", "1", "--workers", "1"]
        lines: list[dict[str, Any]] = []
        service = subprocess.Popen(
            as_a_plain_user(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=environment,
            text=True,
        )

        def read() -> None:
            assert service.stdout is not None
            lines.extend(json.loads(line) for line in service.stdout if line.startswith("{"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            events = lambda name: [line for line in list(lines) if line["event"] == name]  # noqa: E731
            wait_until(lambda: events("service_ready"), timeout=60)
            # Unreadable before it arrives: the service may claim it the moment it does.
            hidden = save_npy(root / "inbox" / ".case_locked.npy.tmp", prediction(1))
            hidden.chmod(0o000)
            hidden.rename(root / "inbox" / "case_locked.npy")
            wait_until(lambda: events("input_retrying"), timeout=30)
            assert "Permission denied" in events("input_retrying")[0]["error"]
            for path in root.rglob("case_locked.npy"):
                path.chmod(0o644)
            wait_until(lambda: events("input_converted"), timeout=60)
            assert events("input_failed") == []
            assert (root / "archive" / "case_locked.npy").is_file()
            assert (root / "outbox" / "case_locked.nii.gz").is_file()
        finally:
            service.terminate()
            service.wait(timeout=60)
            reader.join(timeout=10)
            assert service.stdout is not None
            service.stdout.close()
