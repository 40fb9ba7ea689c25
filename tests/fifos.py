"""Named pipes in tests: a FIFO stands in for a file whose reader blocks."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path


def wait_for_reader(fifo: Path, timeout: float = 30.0) -> int:
    """Open `fifo` for writing as soon as someone opens it for reading; the descriptor."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:  # ENXIO: no reader yet
            if error.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
        time.sleep(0.02)
