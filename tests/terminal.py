"""A terminal for the tests: what a screen shows of some output, and commands run on a
pseudo-terminal (so that they see a real TTY on stdout and stderr)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Sequence

WIDTH = 120  # columns of the test terminal
HEIGHT = 40

# Control sequences: colours ("m"), cursor up ("A"), erase in line ("K"), others.
_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z ")


class Screen:
    """The text a terminal `width` columns wide shows after `feed`, scrollback included.

    Characters overwrite what is under the cursor, "\\r" goes back to the start of
    the row, "\\n" to the start of the next (as a terminal does with `onlcr`), and a
    row that is full wraps. `lines()` joins wrapped rows, so each is a line as written.
    """

    def __init__(self, width: int = WIDTH) -> None:
        self.width = width
        self._rows: list[list[str]] = [[]]
        self._wrapped: list[bool] = [False]  # row i continues on row i + 1
        self._row = 0
        self._col = 0

    def feed(self, text: str) -> Screen:
        """Receive `text`; returns self."""
        position = 0
        for sequence in _CSI.finditer(text):
            self._characters(text[position : sequence.start()])
            self._control(sequence.group(1), sequence.group(2))
            position = sequence.end()
        self._characters(text[position:])
        return self

    def lines(self) -> list[str]:
        """The lines on screen (wrapped rows joined, trailing blanks dropped)."""
        lines: list[str] = []
        joined = ""
        for row, wrapped in zip(self._rows, self._wrapped, strict=True):
            joined += "".join(row)
            if not wrapped:
                lines.append(joined.rstrip())
                joined = ""
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def _characters(self, text: str) -> None:
        for character in text:
            if character == "\r":
                self._col = 0
            elif character == "\n":
                self._move_to(self._row + 1)
                self._col = 0
            else:
                if self._col >= self.width:  # the row is full: the terminal wraps
                    self._wrapped[self._row] = True
                    self._move_to(self._row + 1)
                    self._col = 0
                row = self._rows[self._row]
                row.extend(" " * (self._col + 1 - len(row)))
                row[self._col] = character
                self._col += 1

    def _control(self, parameters: str, command: str) -> None:
        if command == "m":
            return  # colours
        if command == "A":
            self._move_to(max(0, self._row - int(parameters or "1")))
        elif command == "K" and parameters in ("", "0"):
            del self._rows[self._row][self._col :]
        else:
            raise AssertionError(f"the test terminal does not know ESC[{parameters}{command}")

    def _move_to(self, row: int) -> None:
        while len(self._rows) <= row:
            self._rows.append([])
            self._wrapped.append(False)
        self._row = row


def is_log_line(line: str) -> bool:
    """Whether `line` is a whole console log line from its start (a timestamp first)."""
    return _TIMESTAMP.match(line) is not None


def run_on_terminal(
    command: Sequence[str], *, env: dict[str, str], timeout: float = 120
) -> tuple[int, str]:
    """Run `command` with stdin, stdout and stderr on one pseudo-terminal; returns its
    exit code and everything the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", HEIGHT, WIDTH, 0, 0))
    process = subprocess.Popen(
        command, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([master], [], [], max(0.0, left))
            if not readable:
                raise AssertionError(f"{command[:4]} still wrote after {timeout:g} s")
            try:
                chunk = os.read(master, 65536)
            except OSError as error:  # EIO: every writer has closed the terminal
                if error.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            received += chunk
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        with contextlib.suppress(OSError):
            os.close(master)
    return code, received.decode("utf-8", errors="replace")
