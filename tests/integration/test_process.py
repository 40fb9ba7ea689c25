"""The service as a real process: signals, systemd notify, graceful stop (README: Logs)."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from support import (
    ServiceProcess,
    drop_by_rename,
    files_in,
    output_of,
    prediction,
    save_npy,
    write_reference,
)

from spools import instance_folder
from waiting import wait_until

FAST = ["--settle-seconds", "0.3", "--heartbeat-interval", "0.5", "--workers", "2"]


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(0.05)
        self.messages: list[str] = []

    def receive(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except TimeoutError:
                return self.messages


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify.sock")
    yield receiver
    receiver.socket.close()


class TestSignals:
    def test_sigterm_after_work_exits_0_with_systemd_messages(
        self,
        root: Path,
        start_process: Callable[..., ServiceProcess],
        notify_socket: NotifySocket,
    ) -> None:
        """READY/STATUS/WATCHDOG/STOPPING reach NOTIFY_SOCKET; SIGTERM gives exit 0."""
        env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"}
        process = start_process(root, *FAST, env=env).wait_ready()
        children = process.children()
        assert len(children) == 2  # a conversion process per worker
        drop_by_rename(root / "inbox", "case_1.npy", prediction(1))
        wait_until(lambda: process.events("input_converted"), what="input_converted")
        wait_until(lambda: "WATCHDOG=1" in notify_socket.receive(), what="WATCHDOG=1")
        process.send(signal.SIGTERM)
        assert process.wait() == 0
        assert process.children() == []
        messages = notify_socket.receive()
        assert messages[0] == "READY=1"
        assert any(message.startswith("STATUS=") for message in messages)
        assert messages[-1] == "STOPPING=1"
        (line,) = process.events("input_converted")
        assert line["input"] == "case_1.npy"
        assert line["rule"] == "reference_prefix"
        for event in ("service_started", "library_indexed", "service_stopping"):
            assert process.events(event), event
        assert process.lines[-1]["event"] == "service_stopped"
        assert all({"timestamp", "level", "event"} <= set(line) for line in process.lines)

    def test_ready_comes_only_after_indexing_and_watching(
        self,
        root: Path,
        start_process: Callable[..., ServiceProcess],
        notify_socket: NotifySocket,
    ) -> None:
        """READY=1 is sent after library_indexed, and a drop right after READY is seen."""
        env = {"NOTIFY_SOCKET": str(notify_socket.path)}
        process = start_process(root, *FAST, env=env)
        wait_until(lambda: "READY=1" in notify_socket.receive(), 60, "READY=1")
        assert process.events("library_indexed")
        drop_by_rename(root / "inbox", "case_2.npy", prediction(2))
        wait_until(lambda: process.events("input_converted"), what="input_converted")
        process.send(signal.SIGTERM)
        assert process.wait() == 0

    def test_sighup_rescans_library_and_inbox(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """SIGHUP re-indexes the library (a second library_indexed) and keeps running."""
        process = start_process(root, *FAST).wait_ready()
        process.send(signal.SIGHUP)
        wait_until(lambda: len(process.events("library_indexed")) == 2, what="re-index")
        assert process.process.poll() is None
        process.send(signal.SIGINT)
        assert process.wait() == 0

    def test_second_sigint_stops_at_once(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """Two SIGINTs end the service promptly with exit 0."""
        process = start_process(root, *FAST).wait_ready()
        process.send(signal.SIGINT)
        process.send(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert process.events("service_stopped")

    def test_bad_config_exits_2(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """An invalid setting is reported, naming its flag, the value and what is
        allowed, with exit code 2."""
        process = start_process(root, "--settle-seconds", "-1")
        assert process.wait() == 2
        expected = 'flag --settle-seconds: expected a number, at least 0, found "-1"'
        assert expected in "".join(process.stderr)


class TestGracefulStop:
    @pytest.fixture
    def large_root(self, root: Path) -> Path:
        shape = (256, 256, 160)
        write_reference(root / "library" / "big.nii.gz", shape)
        data = np.random.default_rng(0).random(shape, dtype=np.float32)
        save_npy(root / "big.npy", data)
        return root

    def test_sigterm_during_a_large_conversion_finishes_it(
        self, large_root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """SIGTERM while a large input converts: it finishes, exit 0 within the timeout."""
        root = large_root
        process = start_process(root, *FAST, "--shutdown-timeout", "60").wait_ready()
        (root / "big.npy").rename(root / "inbox" / "big.npy")
        claims = instance_folder(root) / "claimed"
        wait_until(lambda: any(claims.iterdir()), what="the claim")
        sent = time.monotonic()
        process.send(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
        assert time.monotonic() - sent < 60
        assert files_in(root / "archive") == ["big.npy"]
        assert output_of(root, "big.npy").shape == (256, 256, 160)

    def test_no_patience_leaves_the_input_claimed_for_the_next_start(
        self, large_root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """With shutdown_timeout 0 the input stays claimed and the next start converts it."""
        root = large_root
        process = start_process(root, *FAST, "--shutdown-timeout", "0").wait_ready()
        (root / "big.npy").rename(root / "inbox" / "big.npy")
        claims = instance_folder(root) / "claimed"
        wait_until(lambda: any(claims.iterdir()), what="the claim")
        process.send(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        if not files_in(root / "archive"):  # stopped before the conversion ended
            assert process.events("inputs_left_claimed")
            assert files_in(claims)
        again = start_process(root, *FAST, "--once")
        assert again.wait(timeout=120) == 0
        assert files_in(root / "archive") == ["big.npy"]
        assert not any(claims.iterdir())
        assert [name for name in files_in(root / "outbox") if name.startswith(".")] == []
