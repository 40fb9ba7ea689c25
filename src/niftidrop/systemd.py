"""The systemd notification protocol, sd_notify(3), in a few lines of `socket`.

With `Type=notify` systemd passes `NOTIFY_SOCKET` (a path, or `@name` for an
abstract socket) and, with `WatchdogSec=`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

# How long one message may wait for room: a datagram socket whose reader has
# fallen behind (its queue holds `net.unix.max_dgram_qlen` messages, 10 by default)
# blocks the sender, and the main loop must never stop turning for that.
SEND_TIMEOUT_SECONDS = 1.0


class SystemdNotifier:
    """sd_notify(3) over `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket)."""

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, timeout: float = SEND_TIMEOUT_SECONDS
    ) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2  # ping twice per period
        self._timeout = timeout
        self._socket: socket.socket | None = None

    def notify(self, message: str) -> bool:
        """Send `message` (e.g. "READY=1"); False when not under systemd or it failed
        (or found no room within the send timeout: the message is dropped)."""
        if not self.address:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.settimeout(self._timeout)
            self._socket.sendto(message.encode(), self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
