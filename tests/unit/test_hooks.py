"""Tests of delivering events (README: Hand-off): real hook processes, a real HTTP server."""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from niftidrop import hooks
from niftidrop.config_sources import HOOK_VARIABLES
from niftidrop.events import EVENTS
from niftidrop.hooks import (
    Deliveries,
    DeliveryFailed,
    HookRunner,
    backoff,
    hook_environment,
    post_event,
)
from niftidrop.settings import load_settings
from niftidrop.spool import Spool
from spools import converted, drop
from waiting import wait_until

# Writes its stdin and its NIFTIDROP_* variables to the file named by its argument.
RECORDER = """
import json, os, sys
event = sys.stdin.read()
variables = {k: v for k, v in os.environ.items() if k.startswith("NIFTIDROP_")}
with open(sys.argv[1], "a") as file:
    file.write(json.dumps({"stdin": event, "env": variables}) + "\\n")
"""
EVENT = {
    "event": "converted",
    "id": "20261202T000000000000Z-00000000",
    "input": "site/a b.npy",
    "outputs": ["/o/site/a b.nii.gz", "/o/site/a b_c1.nii.gz"],
    "sidecar": None,
    "archived": "/a/site/a b.npy",
}


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class TestEnvironment:
    def test_the_key_paths_are_variables(self) -> None:
        """NIFTIDROP_EVENT, the id, the input and the paths it has; the first output."""
        environment = hook_environment(EVENT, {"PATH": "/bin"})
        assert environment == {
            "PATH": "/bin",
            "NIFTIDROP_EVENT": "converted",
            "NIFTIDROP_EVENT_ID": EVENT["id"],
            "NIFTIDROP_INPUT": "site/a b.npy",
            "NIFTIDROP_OUTPUT": "/o/site/a b.nii.gz",
            "NIFTIDROP_ARCHIVED": "/a/site/a b.npy",
        }

    def test_an_inherited_event_variable_is_not_passed_on(self) -> None:
        """A service started by a hook does not hand its own event's variables on."""
        inherited = dict.fromkeys(HOOK_VARIABLES.values(), "old")
        failed = {"event": "failed", "id": "x", "input": "a.npy", "failed_as": "/f/a.npy"}
        environment = hook_environment(failed, inherited)
        assert environment == {
            "NIFTIDROP_EVENT": "failed",
            "NIFTIDROP_EVENT_ID": "x",
            "NIFTIDROP_INPUT": "a.npy",
            "NIFTIDROP_FAILED_AS": "/f/a.npy",
        }


class TestBackoff:
    def test_doubles_up_to_the_cap(self) -> None:
        """1 s, 2 s, 4 s ... never more than 60 s between tries."""
        assert [backoff(tries) for tries in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
        assert backoff(30) == 60.0


class TestHookRunner:
    def test_the_event_on_stdin_and_in_variables(self, tmp_path: Path) -> None:
        """The hook reads the event as one JSON object, and its paths as variables."""
        log = tmp_path / "hook.jsonl"
        HookRunner(10).run(python(RECORDER, str(log)), EVENT)
        [line] = [json.loads(text) for text in log.read_text().splitlines()]
        assert json.loads(line["stdin"]) == EVENT
        assert line["env"]["NIFTIDROP_OUTPUT"] == "/o/site/a b.nii.gz"

    def test_a_failing_hook_says_its_status_and_stderr(self) -> None:
        """Exit status and the end of stderr make the reason."""
        command = python("import sys; sys.stderr.write('no upload: quota'); sys.exit(3)")
        with pytest.raises(DeliveryFailed, match=r"^exited with status 3: no upload: quota$"):
            HookRunner(10).run(command, EVENT)

    def test_a_hook_killed_by_a_signal(self) -> None:
        """A hook that dies of a signal is named so."""
        command = python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
        with pytest.raises(DeliveryFailed, match=r"^killed by SIGSEGV"):
            HookRunner(10).run(command, EVENT)

    def test_a_program_that_cannot_start(self, tmp_path: Path) -> None:
        """A missing program is a failed try, not an exception of the service."""
        with pytest.raises(DeliveryFailed, match=r"^cannot start .*absent.*No such file"):
            HookRunner(10).run([str(tmp_path / "absent")], EVENT)

    def test_a_hanging_hook_is_killed_with_its_children(self, tmp_path: Path) -> None:
        """Over hook_timeout the whole process group is killed, children included."""
        pid_file = tmp_path / "child.pid"
        command = python(
            "import subprocess, sys, time\n"
            "child = subprocess.Popen(['sleep', '300'])\n"
            "open(sys.argv[1], 'w').write(str(child.pid))\n"
            "time.sleep(300)\n",
            str(pid_file),
        )
        started = time.monotonic()
        with pytest.raises(DeliveryFailed, match=r"ran over hook_timeout \(1 s\)"):
            HookRunner(1).run(command, EVENT)
        assert time.monotonic() - started < 10
        child = int(pid_file.read_text())
        wait_until(lambda: not alive(child), 10, "the hook's child to be killed")

    def test_a_background_job_holding_stderr_is_ended_at_the_timeout(self) -> None:
        """The hook exits 0 but leaves a child on its stderr: the exit status decides, and
        the child is killed at the timeout."""
        command = python("import subprocess; subprocess.Popen(['sleep', '300'])")
        HookRunner(1).run(command, EVENT)

    def test_a_hook_that_reads_nothing(self) -> None:
        """A hook that ignores its stdin (even a large event) still succeeds."""
        large = {**EVENT, "message": "x" * 1_000_000}
        HookRunner(10).run(["true"], large)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Records each POST; answers with the status the test's server holds."""

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        server: Any = self.server
        server.received.append((self.headers["Content-Type"], self.rfile.read(length)))
        self.send_response(server.status)
        if server.status == 302:
            self.send_header("Location", "/elsewhere")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Any]:
    """A local HTTP server on a free port, in a thread."""
    httpd: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.received = []
    httpd.status = 200
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/events"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


class TestPost:
    def test_the_event_is_posted_as_json(self, server: Any) -> None:
        """One POST, Content-Type application/json, the event as its body."""
        post_event(server.url, EVENT, 5)
        assert server.received == [("application/json", json.dumps(EVENT).encode())]

    @pytest.mark.parametrize(("status", "reason"), [(500, "HTTP 500"), (302, "HTTP 302")])
    def test_an_error_or_a_redirect_is_a_failed_try(
        self, server: Any, status: int, reason: str
    ) -> None:
        """Anything but 2xx fails; a redirect is not followed."""
        server.status = status
        with pytest.raises(DeliveryFailed, match=f"^{reason}"):
            post_event(server.url, EVENT, 5)
        assert len(server.received) == 1

    def test_a_server_that_is_down(self, server: Any) -> None:
        """Nothing listening: the reason says so."""
        url = server.url
        server.shutdown()
        server.server_close()
        with pytest.raises(DeliveryFailed, match="refused"):
            post_event(url, EVENT, 5)


def deliveries(root: Path, **values: Any) -> tuple[Spool, Deliveries]:
    """A spool with the settings `values`, and its deliveries (not started)."""
    settings = load_settings(root=root, fsync=False, **values)
    spool = Spool(settings)
    spool.create_folders()
    return spool, Deliveries(settings, spool.events)


def pending_files(spool: Spool) -> list[str]:
    folder = spool.instance_folder / EVENTS
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "FIRST_RETRY_SECONDS", 0.01)


@pytest.fixture
def running() -> Iterator[Callable[[Deliveries], Deliveries]]:
    """Start deliveries; each is stopped at the end of the test."""
    started: list[Deliveries] = []

    def start(delivery: Deliveries) -> Deliveries:
        delivery.start()
        started.append(delivery)
        return delivery

    yield start
    for delivery in started:
        delivery.stop(time.monotonic(), force=lambda: True)


class TestDeliveries:
    def test_a_delivered_event_is_removed(
        self, tmp_path: Path, running: Callable[[Deliveries], Deliveries]
    ) -> None:
        """The hook runs once per input finish; then its event leaves the state folder."""
        log = tmp_path / "hook.jsonl"
        spool, delivery = deliveries(tmp_path, on_converted=python(RECORDER, str(log)))
        running(delivery)
        with capture_logs() as logs:
            spool.handle(spool.claim(drop(spool, "a.npy")), converted)  # type: ignore[arg-type]
            wait_until(delivery.idle, 10, "the delivery")
        assert json.loads(json.loads(log.read_text())["stdin"])["input"] == "a.npy"
        assert pending_files(spool) == []
        [done] = [line for line in logs if line["event"] == "event_delivered"]
        assert done["target"] == "on_converted"
        assert done["attempt"] == 1

    def test_hooks_run_below_the_conversions_priority(
        self, tmp_path: Path, running: Callable[[Deliveries], Deliveries]
    ) -> None:
        """A hook runs at nice HOOK_NICENESS above the service's: conversions come first."""
        niceness = tmp_path / "nice"
        code = "import os, sys; open(sys.argv[1], 'w').write(str(os.nice(0)))"
        spool, delivery = deliveries(tmp_path, on_converted=python(code, str(niceness)))
        running(delivery)
        spool.handle(spool.claim(drop(spool, "a.npy")), converted)  # type: ignore[arg-type]
        wait_until(lambda: pending_files(spool) == [], 10, "the delivery")
        assert int(niceness.read_text()) == min(19, os.nice(0) + hooks.HOOK_NICENESS)

    @pytest.mark.usefixtures("quick_retries")
    def test_failed_tries_are_logged_then_the_event_is_dropped(
        self, tmp_path: Path, running: Callable[[Deliveries], Deliveries]
    ) -> None:
        """hook_attempts tries, each logged as hook_failed; then event_dropped, an error."""
        spool, delivery = deliveries(tmp_path, on_converted=["false"], hook_attempts=3)
        running(delivery)
        with capture_logs() as logs:
            spool.handle(spool.claim(drop(spool, "a.npy")), converted)  # type: ignore[arg-type]
            wait_until(lambda: any(line["event"] == "event_dropped" for line in logs), 10)
        failed = [line for line in logs if line["event"] == "hook_failed"]
        assert [line["attempt"] for line in failed] == [1, 2, 3]
        assert {line["reason"] for line in failed} == {"exited with status 1"}
        assert [line["retry_in"] for line in failed] == [0.01, 0.02, None]
        [dropped] = [line for line in logs if line["event"] == "event_dropped"]
        assert dropped["log_level"] == "error"
        assert dropped["payload"]["input"] == "a.npy"
        wait_until(lambda: pending_files(spool) == [], 10, "the dropped event removed")

    @pytest.mark.usefixtures("quick_retries")
    def test_each_target_is_tried_on_its_own(
        self, tmp_path: Path, server: Any, running: Callable[[Deliveries], Deliveries]
    ) -> None:
        """The URL failing does not run the hook again once it has succeeded."""
        log = tmp_path / "hook.jsonl"
        server.status = 503
        spool, delivery = deliveries(
            tmp_path, on_converted=python(RECORDER, str(log)), notify_url=server.url
        )
        running(delivery)
        with capture_logs() as logs:
            spool.handle(spool.claim(drop(spool, "a.npy")), converted)  # type: ignore[arg-type]
            wait_until(lambda: len(server.received) >= 2, 10, "a second POST")
            server.status = 200
            wait_until(lambda: pending_files(spool) == [], 10, "the delivery")
        assert len(log.read_text().splitlines()) == 1
        assert {line["event"] for line in logs} >= {"notify_failed", "event_delivered"}

    def test_a_stop_kills_hooks_in_flight_and_keeps_their_events(self, tmp_path: Path) -> None:
        """At the deadline a hanging hook is killed (not a failed try) and its event stays
        pending; the count left is logged."""
        started_file = tmp_path / "started"
        hang = python(
            "import sys, time; open(sys.argv[1], 'w'); time.sleep(300)", str(started_file)
        )
        spool, delivery = deliveries(tmp_path, on_converted=hang, hook_timeout=300)
        delivery.start()
        with capture_logs() as logs:
            spool.handle(spool.claim(drop(spool, "a.npy")), converted)  # type: ignore[arg-type]
            wait_until(started_file.exists, 10, "the hook")
            started = time.monotonic()
            delivery.stop(time.monotonic() + 0.5, force=lambda: False)
        assert time.monotonic() - started < 8
        assert len(pending_files(spool)) == 1
        assert [line["event"] for line in logs] == ["events_left_pending"]
        assert logs[0]["events"] == 1

    def test_pending_events_are_delivered_at_start(self, tmp_path: Path) -> None:
        """What a previous run left is delivered when the deliveries start."""
        log = tmp_path / "hook.jsonl"
        spool, _ = deliveries(tmp_path, on_converted=python(RECORDER, str(log)))
        spool.handle(spool.claim(drop(spool, "a.npy")), converted)  # type: ignore[arg-type]
        assert len(pending_files(spool)) == 1
        _, delivery = deliveries(tmp_path, on_converted=python(RECORDER, str(log)))
        delivery.start()
        try:
            wait_until(lambda: pending_files(spool) == [], 10, "the delivery")
        finally:
            delivery.stop(time.monotonic(), force=lambda: True)
        assert len(log.read_text().splitlines()) == 1

    def test_without_a_store_nothing_runs(self, tmp_path: Path) -> None:
        """No hook configured: no thread, always idle, a stop says nothing."""
        _, delivery = deliveries(tmp_path)
        delivery.start()
        assert delivery.idle()
        with capture_logs() as logs:
            delivery.stop(time.monotonic(), force=lambda: False)
        assert logs == []
