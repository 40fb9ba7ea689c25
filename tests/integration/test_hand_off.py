"""Telling the next step (README: Hand-off): the real service runs real hook commands
and POSTs to a real HTTP server, at least once, without ever slowing the spool."""

from __future__ import annotations

import http.server
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ServiceProcess, prediction, save_npy

from niftidrop.events import EVENTS
from spools import instance_folder
from waiting import wait_until

# Appends one line per run: its stdin (the event) and its NIFTIDROP_* variables. With a
# file `down` next to its log, it fails instead (a consumer that is not there yet).
RECORDER = """
import json, os, sys
log = sys.argv[1]
event = sys.stdin.read()
if os.path.exists(os.path.join(os.path.dirname(log), "down")):
    sys.exit("consumer down")
variables = {k: v for k, v in os.environ.items() if k.startswith("NIFTIDROP_")}
variables.pop("NIFTIDROP_LOG_FORMAT", None)  # the service's own, inherited
with open(log, "a") as file:
    file.write(json.dumps({"stdin": json.loads(event), "env": variables}) + "\\n")
"""
FAST = ["--settle-seconds", "0.05", "--workers", "2", "--heartbeat-interval", "0.5"]


def recorder(log: Path) -> str:
    """The recording hook as the JSON list a flag takes."""
    return json.dumps([sys.executable, "-c", RECORDER, str(log)])


def recorded(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def pending(root: Path) -> list[Path]:
    folder = instance_folder(root) / EVENTS
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def drop(root: Path, relative: str, shape: tuple[int, ...] = (6, 5, 4), seed: int = 0) -> Path:
    """An input renamed into the inbox (the reference `case.nii.gz` is 6 x 5 x 4)."""
    final = root / "inbox" / relative
    temporary = save_npy(final.with_name(f".{final.name}.tmp"), prediction(seed, shape))
    return temporary.rename(final)


class TestEvents:
    def test_the_json_and_the_paths_of_each_finish(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """converted and failed: the log line's fields plus absolute paths that exist,
        on stdin, and the same in NIFTIDROP_* variables."""
        log = root / "hooks" / "events.jsonl"
        log.parent.mkdir()
        process = start_process(
            root, *FAST, "--sidecar", "--on-converted", recorder(log), "--on-failed", recorder(log)
        ).wait_ready()
        drop(root, "site/case_01.npy")
        drop(root, "case_02.npy", shape=(3, 3, 3))
        wait_until(lambda: len(recorded(log)) == 2, 30, "both hooks")
        process.send(signal.SIGTERM)
        assert process.wait() == 0
        by_kind = {line["stdin"]["event"]: line for line in recorded(log)}
        done = by_kind["converted"]["stdin"]
        [logged] = process.events("input_converted")
        assert {key: done[key] for key in logged if key not in ("event", "level", "timestamp")} == {
            key: value
            for key, value in logged.items()
            if key not in ("event", "level", "timestamp")
        }
        assert done["outputs"] == [str(root / "outbox" / "site" / "case_01.nii.gz")]
        assert done["sidecar"] == str(root / "outbox" / "site" / "case_01.json")
        assert done["archived"] == str(root / "archive" / "site" / "case_01.npy")
        for path in (*done["outputs"], done["sidecar"], done["archived"]):
            assert Path(path).is_absolute(), path
            assert Path(path).exists(), path
        assert by_kind["converted"]["env"] == {
            "NIFTIDROP_EVENT": "converted",
            "NIFTIDROP_EVENT_ID": done["id"],
            "NIFTIDROP_INPUT": "site/case_01.npy",
            "NIFTIDROP_OUTPUT": done["outputs"][0],
            "NIFTIDROP_SIDECAR_FILE": done["sidecar"],
            "NIFTIDROP_ARCHIVED": done["archived"],
        }
        failed = by_kind["failed"]["stdin"]
        assert failed["input"] == "case_02.npy"
        assert failed["error"] == "shape_mismatch"
        assert failed["failed_as"] == str(root / "failed" / "case_02.npy")
        assert json.loads(Path(failed["error_file"]).read_text())["error"] == "shape_mismatch"
        assert by_kind["failed"]["env"]["NIFTIDROP_FAILED_AS"] == failed["failed_as"]
        assert done["id"] != failed["id"]
        assert pending(root) == []

    def test_run_once_waits_for_its_hooks(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """`run --once` exits after the hooks of what it converted have run."""
        log = root / "events.jsonl"
        drop(root, "case_01.npy")
        process = start_process(root, "--once", *FAST, "--on-converted", recorder(log))
        assert process.wait() == 0
        assert [line["stdin"]["input"] for line in recorded(log)] == ["case_01.npy"]


class TestFailures:
    def test_a_failing_hook_never_changes_the_input_s_fate(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """Every try is logged with input, attempt and reason; the input stays archived."""
        process = start_process(
            root,
            *FAST,
            "--on-converted",
            json.dumps([sys.executable, "-c", "import sys; sys.exit('no quota left')"]),
            "--hook-attempts",
            "2",
        ).wait_ready()
        drop(root, "case_01.npy")
        wait_until(lambda: process.events("event_dropped"), 30, "the last try")
        process.send(signal.SIGTERM)
        assert process.wait() == 0
        failed = process.events("hook_failed")
        assert [(line["input"], line["attempt"]) for line in failed] == [
            ("case_01.npy", 1),
            ("case_01.npy", 2),
        ]
        assert failed[0]["reason"] == "exited with status 1: no quota left"
        assert (root / "archive" / "case_01.npy").exists()
        assert not (root / "failed").exists() or not list((root / "failed").iterdir())
        assert pending(root) == []

    def test_a_hanging_hook_is_killed_at_the_timeout(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """A hook that never ends is killed after hook_timeout, with what it started."""
        child_pid = root / "child.pid"
        hang = [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "child = subprocess.Popen(['sleep', '300'])\n"
            "open(sys.argv[1], 'w').write(str(child.pid))\n"
            "time.sleep(300)\n",
            str(child_pid),
        ]
        process = start_process(
            root, *FAST, "--on-converted", json.dumps(hang), "--hook-timeout", "1"
        ).wait_ready()
        drop(root, "case_01.npy")
        wait_until(lambda: process.events("hook_failed"), 30, "the timeout")
        [failed] = process.events("hook_failed")[:1]
        assert failed["reason"] == "ran over hook_timeout (1 s): its process group was killed"
        assert not Path(f"/proc/{child_pid.read_text()}").exists() or (
            Path(f"/proc/{child_pid.read_text()}/stat").read_text().rsplit(")", 1)[1].split()[0]
            == "Z"
        )
        process.send(signal.SIGTERM)
        assert process.wait() == 0


class TestRestarts:
    def test_delivered_after_a_restart_when_the_first_tries_failed(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """The consumer is down, the service is killed; once it is up, the next start
        delivers the kept event, once."""
        log = root / "hooks" / "events.jsonl"
        log.parent.mkdir()
        (log.parent / "down").touch()
        args = [*FAST, "--on-converted", recorder(log), "--hook-attempts", "20"]
        first = start_process(root, *args).wait_ready()
        drop(root, "case_01.npy")
        wait_until(lambda: len(first.events("hook_failed")) >= 2, 30, "two failed tries")
        first.kill()
        [kept] = pending(root)
        assert json.loads(kept.read_text())["tries"]["hook"] >= 1
        (log.parent / "down").unlink()
        second = start_process(root, *args).wait_ready()
        wait_until(lambda: pending(root) == [], 30, "the delivery after the restart")
        second.send(signal.SIGTERM)
        assert second.wait() == 0
        [line] = recorded(log)
        assert line["stdin"]["input"] == "case_01.npy"
        assert (root / "archive" / "case_01.npy").exists()


class _Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        server: Any = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server.received.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def receiver(free_port: int) -> Iterator[Callable[[], Any]]:
    """Starts, when called, an HTTP server on `free_port` (nothing listens before)."""
    servers: list[Any] = []

    def start() -> Any:
        server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", free_port), _Receiver)
        server.received = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class TestNotifyUrl:
    def test_posted_once_the_server_is_up(
        self,
        root: Path,
        free_port: int,
        receiver: Callable[[], Any],
        start_process: Callable[..., ServiceProcess],
    ) -> None:
        """Down first: notify_failed, kept; then up: the event is POSTed as JSON."""
        url = f"http://127.0.0.1:{free_port}/events"
        process = start_process(
            root, *FAST, "--notify-url", url, "--hook-attempts", "20"
        ).wait_ready()
        drop(root, "case_01.npy")
        wait_until(lambda: process.events("notify_failed"), 30, "a failed POST")
        assert "refused" in process.events("notify_failed")[0]["reason"]
        assert len(pending(root)) == 1
        server = receiver()
        wait_until(lambda: server.received, 30, "the POST")
        wait_until(lambda: pending(root) == [], 10, "the event removed")
        process.send(signal.SIGTERM)
        assert process.wait() == 0
        [(content_type, event)] = server.received
        assert content_type == "application/json"
        assert event["event"] == "converted"
        assert event["archived"] == str(root / "archive" / "case_01.npy")


class TestSecurity:
    NAMES = (
        "$(touch pwned).npy",
        "a\ntouch pwned2.npy",
        "x;touch pwned3.npy",
        "`touch pwned4`.npy",
    )

    def test_names_never_reach_a_shell(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """Names like `$(touch pwned).npy` reach the hooks only as data: nothing is run,
        even by a shell script that uses the variables (quoted) and the JSON."""
        log = root / "events.jsonl"
        shell_log = root / "shell.log"
        shell_hook = json.dumps(
            [
                "sh",
                "-c",
                'printf "%s|%s\\n" "$NIFTIDROP_EVENT" "$NIFTIDROP_INPUT" >> "$0"',
                str(shell_log),
            ]
        )
        process = start_process(
            root,
            *FAST,
            "--missing-reference",
            "identity",
            "--on-converted",
            recorder(log),
            "--on-failed",
            shell_hook,
        ).wait_ready()
        for seed, name in enumerate(self.NAMES):
            drop(root, name, seed=seed)
        bad = root / "inbox" / "$(touch pwned5).npy"
        bad.write_bytes(b"not an array at all")
        wait_until(lambda: len(recorded(log)) == len(self.NAMES), 30, "every converted hook")
        wait_until(shell_log.exists, 30, "the failed hook")
        process.send(signal.SIGTERM)
        assert process.wait() == 0
        assert sorted(line["stdin"]["input"] for line in recorded(log)) == sorted(self.NAMES)
        assert sorted(line["env"]["NIFTIDROP_INPUT"] for line in recorded(log)) == sorted(
            self.NAMES
        )
        assert shell_log.read_text() == "failed|$(touch pwned5).npy\n"
        for folder in (Path.cwd(), root, root / "inbox", root / "archive", root / "outbox"):
            assert not [path for path in folder.iterdir() if path.name.startswith("pwned")]


class TestSlowHooks:
    def test_a_slow_hook_does_not_slow_the_spool(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """Hooks that sleep 10 s: 20 inputs are archived long before the first hook ends;
        a stop then waits no longer than shutdown_timeout and keeps the events pending."""
        sleeper = json.dumps([sys.executable, "-c", "import time; time.sleep(10)"])
        process = start_process(
            root, *FAST, "--on-converted", sleeper, "--shutdown-timeout", "1"
        ).wait_ready()
        started = time.monotonic()
        for index in range(20):
            drop(root, f"case_{index:02d}.npy", seed=index)
        wait_until(lambda: len(process.events("input_converted")) == 20, 30, "20 conversions")
        converted_in = time.monotonic() - started
        assert converted_in < 8, f"20 inputs took {converted_in:.1f} s beside 10 s hooks"
        assert process.events("event_delivered") == []
        stopping = time.monotonic()
        process.send(signal.SIGTERM)
        assert process.wait() == 0
        assert time.monotonic() - stopping < 8
        [left] = process.events("events_left_pending")
        assert left["events"] == 20
        assert len(pending(root)) == 20
        assert len(list((root / "archive").iterdir())) == 20
