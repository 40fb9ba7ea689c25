"""Tests of the systemd notification protocol (README: Running the service)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from niftidrop.systemd import SystemdNotifier


class TestNotifier:
    def test_sends_datagrams_to_a_path_socket(self, tmp_path: Path) -> None:
        """With NOTIFY_SOCKET a path, notify() sends the message as one datagram."""
        address = str(tmp_path / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind(address)
            notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
            assert notifier.notify("READY=1")
            assert receiver.recv(100) == b"READY=1"
            notifier.close()

    def test_abstract_socket_names(self) -> None:
        """An @name address is Linux's abstract namespace."""
        name = f"niftidrop-test-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind("\0" + name)
            notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
            assert notifier.notify("STOPPING=1")
            assert receiver.recv(100) == b"STOPPING=1"
            notifier.close()

    def test_without_systemd_nothing_is_sent(self) -> None:
        """Without NOTIFY_SOCKET notify() is a no-op."""
        assert not SystemdNotifier({}).notify("READY=1")

    def test_watchdog_interval_is_half_the_period(self) -> None:
        """WATCHDOG_USEC gives a ping every half period, only for our own pid."""
        mine = SystemdNotifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
        assert mine.watchdog_interval == 1.0
        other = SystemdNotifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
        assert other.watchdog_interval is None

    def test_a_reader_that_falls_behind_never_blocks_the_sender(self, tmp_path: Path) -> None:
        """A full notify socket (its reader stopped reading) makes notify() give up after
        its timeout and return False, instead of blocking the main loop for ever."""
        address = str(tmp_path / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind(address)
            notifier = SystemdNotifier({"NOTIFY_SOCKET": address}, timeout=0.05)
            results = [notifier.notify("WATCHDOG=1") for _ in range(30)]
            assert not all(results)  # the queue filled up: later messages were dropped
            assert receiver.recv(100) == b"WATCHDOG=1"
            assert notifier.notify("STOPPING=1")  # room again once the reader reads
            notifier.close()
