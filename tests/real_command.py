"""The real `niftidrop` command, as a user runs it: the installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def executable() -> Path:
    """The `niftidrop` script installed next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name("niftidrop")
    found = str(beside) if beside.is_file() else shutil.which("niftidrop")
    assert found is not None, "the niftidrop command is not installed (pip install -e .)"
    return Path(found)


def niftidrop(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `niftidrop ARGS...` in a process of its own, on an 80-column terminal's
    layout; its exit code, stdout and stderr."""
    return subprocess.run(
        [str(executable()), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "80"},
        timeout=60,
        check=False,
    )
