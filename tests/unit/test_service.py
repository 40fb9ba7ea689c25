"""Tests of the service life cycle with a fake library and converter (README: File
protocol, Running the service, Logs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from niftidrop.api import ConversionResult
from niftidrop.errors import ConfigError, ConversionError, ErrorCode, ServiceError
from niftidrop.library import Match
from niftidrop.metrics import Metrics
from niftidrop.service import Service, handle_signals
from niftidrop.settings import Settings, load_settings
from niftidrop.spool import Spool
from niftidrop.systemd import SystemdNotifier
from waiting import wait_until


def served_with_two_outcomes(make_service: Callable[..., Running], settings: Settings) -> Running:
    """A service with metrics_address that has converted `a.npy` and failed `orphan.npy`."""
    running = make_service(metrics_address="127.0.0.1:0")
    drop(settings, "a.npy")
    drop(settings, "orphan.npy")
    wait_until(lambda: len(running.events("input_converted")) == 1)
    wait_until(lambda: len(running.events("input_failed")) == 1)
    return running


class FakeLibrary:
    """Every name matches `<library>/ref.nii.gz`, except names starting with "orphan"."""

    def __init__(self, folder: Path) -> None:
        self.reference = folder / "ref.nii.gz"
        self.builds = 0
        self.started = False

    def build(self) -> None:
        self.builds += 1

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def resolve(self, name: str) -> Match:
        if name.startswith("orphan"):
            raise ConversionError(ErrorCode.NO_REFERENCE, f"{name}: expected a reference")
        return Match(name, name, self.reference, "exact", (self.reference,))

    def __len__(self) -> int:
        return 1


class FakeConverter:
    """Copies the input to `<stem>.nii.gz`; can fail with OSError a few times first."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.environment_errors = 0
        self.crashes = 0  # calls that raise `crash`, an exception no converter expects
        self.crash: Exception = MemoryError("Unable to allocate 3.00 GiB")
        self.calls = 0
        self.release = threading.Event()
        self.release.set()

    def __call__(self, source: Path, out_dir: Path, **options: Any) -> ConversionResult:
        """`convert_file`'s call; of its keywords only `stem` matters here."""
        self.release.wait()
        self.calls += 1
        if self.crashes:
            self.crashes -= 1
            raise self.crash
        if self.environment_errors:
            self.environment_errors -= 1
            raise OSError(30, "Read-only file system", str(out_dir))
        self.order.append(source.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        output = out_dir / f"{options['stem']}.nii.gz"
        output.write_bytes(source.read_bytes())
        size = source.stat().st_size
        return ConversionResult(source, (output,), (3,), (3,), "f8", "f8", size, size, 0.001)


class FakeNotifier(SystemdNotifier):
    def __init__(self) -> None:
        super().__init__({})
        self.messages: list[str] = []
        self.watchdog_interval = 0.05

    def notify(self, message: str) -> bool:
        self.messages.append(message)
        return True


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        root=tmp_path,
        fsync=False,
        settle_seconds=0.2,
        heartbeat_interval=0.1,
        rescan_interval=60,
        workers=1,
        shutdown_timeout=10,
    )


class Running:
    """A service in a thread, with its fakes and captured log lines."""

    def __init__(self, service: Service, converter: FakeConverter, logs: list[Any]) -> None:
        self.service = service
        self.converter = converter
        self.logs = logs
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(service.run()))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in list(self.logs) if line["event"] == name]


@pytest.fixture
def make_service(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []
    with capture_logs() as logs:

        def make(**overrides: Any) -> Running:
            chosen = settings.model_copy(update=overrides) if overrides else settings
            converter = FakeConverter()
            service = Service(
                chosen,
                library=FakeLibrary(tmp_path),
                convert_file=converter,
                metrics=Metrics(),
                notifier=FakeNotifier(),
            )
            return Running(service, converter, logs)

        def start(**overrides: Any) -> Running:
            running = make(**overrides)
            running.thread.start()
            wait_until(running.service.ready.is_set)
            started.append(running)
            return running

        yield start
        for running in started:
            running.service.request_stop()
            running.thread.join(timeout=30)


def drop(settings: Settings, relative: str, values: int = 3) -> Path:
    path = settings.inbox_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name("." + path.name + ".tmp")
    with temporary.open("wb") as handle:  # np.save would append .npy to a path
        np.save(handle, np.arange(values, dtype=np.float64))
    temporary.rename(path)
    return path


class TestSignals:
    def test_handlers_set_flags_and_are_restored(self, settings: Settings) -> None:
        """SIGHUP asks for a rescan, SIGTERM for a stop, a second SIGINT forces it."""
        service = Service(settings, library=FakeLibrary(settings.root), metrics=Metrics())
        before = signal.getsignal(signal.SIGTERM)
        with handle_signals(service):
            os.kill(os.getpid(), signal.SIGHUP)
            wait_until(lambda: service._rescan_requested)
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(lambda: service.stop_requested)
            assert not service._force_stop
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(lambda: service._force_stop)
        assert signal.getsignal(signal.SIGTERM) is before


class TestService:
    def test_converts_archives_and_logs_one_summary(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """A dropped input is converted, archived, and logged once with every field."""
        running = make_service()
        drop(settings, "site/a.npy")
        wait_until((settings.archive_dir / "site" / "a.npy").exists)
        assert (settings.outbox_dir / "site" / "a.nii.gz").exists()
        wait_until(lambda: bool(running.events("input_converted")))
        (line,) = running.events("input_converted")
        for field in ("input", "reference", "rule", "output", "shape", "dtype_in", "dtype_out"):
            assert field in line
        for field in ("bytes_in", "bytes_out", "seconds"):
            assert field in line
        assert line["input"] == "site/a.npy"

    def test_library_is_watched_before_it_is_walked(
        self, make_service: Callable[..., Running]
    ) -> None:
        """At start the library is started (its watch set up, then its one walk), not
        walked first and watched later, when a reference added in between is missed."""
        library = make_service().service.library
        assert isinstance(library, FakeLibrary)
        assert library.started
        assert library.builds == 0

    def test_rejection_goes_to_failed_and_the_service_goes_on(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """A rejected input is logged as input_failed; later inputs still convert."""
        running = make_service()
        drop(settings, "orphan.npy")
        drop(settings, "b.npy")
        wait_until((settings.archive_dir / "b.npy").exists)
        wait_until((settings.failed_dir / "orphan.npy.error.json").exists)
        wait_until(lambda: bool(running.events("input_failed")))
        (line,) = running.events("input_failed")
        assert (line["input"], line["error"]) == ("orphan.npy", "no_reference")
        assert "message" in line

    def test_environmental_errors_are_retried_never_failed(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """OSError keeps the input claimed, logs input_retrying with backoff, then converts."""
        running = make_service()
        running.converter.environment_errors = 2
        drop(settings, "a.npy")
        wait_until((settings.archive_dir / "a.npy").exists)
        retries = running.events("input_retrying")
        assert [line["attempt"] for line in retries] == [1, 2]
        assert retries[1]["retry_in"] == 2 * retries[0]["retry_in"]
        assert list(settings.failed_dir.iterdir()) == []

    def test_backlog_goes_oldest_first(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """Files waiting at start are converted in modification-time order."""
        for index, name in enumerate(["c.npy", "a.npy", "b.npy"]):
            path = drop(settings, name)
            os.utime(path, (1000 + [3, 1, 2][index], 1000 + [3, 1, 2][index]))
        running = make_service()
        wait_until(lambda: len(running.converter.order) == 3)
        assert running.converter.order == ["a.npy", "b.npy", "c.npy"]

    def test_lifecycle_events_and_systemd_messages(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """Start and stop are logged in order; READY, WATCHDOG and STOPPING are sent."""
        running = make_service()
        notifier = running.service.notifier
        assert isinstance(notifier, FakeNotifier)
        wait_until(lambda: "WATCHDOG=1" in notifier.messages)
        running.service.request_stop()
        running.thread.join(timeout=30)
        assert running.result == [0]
        names = [line["event"] for line in running.logs]
        expected = ["service_started", "library_indexed", "service_ready"]
        expected += ["service_stopping", "service_stopped"]
        assert [name for name in names if name in expected] == expected
        assert notifier.messages[0] == "READY=1"
        assert notifier.messages[-1] == "STOPPING=1"

    def test_heartbeat_is_refreshed(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """The heartbeat file is rewritten every heartbeat_interval."""
        running = make_service()
        heartbeat = running.service.spool.heartbeat_path
        first = heartbeat.stat().st_mtime_ns
        wait_until(lambda: heartbeat.stat().st_mtime_ns != first)

    def test_rescan_finds_files_without_events(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """A file that produced no event (watch stopped) is found by the rescan."""
        running = make_service()
        watcher = running.service._watcher
        assert watcher is not None
        watcher.stop()
        drop(settings, "silent.npy")
        running.service.request_rescan()
        wait_until((settings.archive_dir / "silent.npy").exists)

    def test_stop_finishes_the_conversion_in_flight(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """A stop during a conversion lets it finish and returns 0."""
        running = make_service()
        running.converter.release.clear()
        drop(settings, "a.npy")
        wait_until(lambda: bool(list(running.service.spool.claims_folder.iterdir())))
        running.service.request_stop()
        running.converter.release.set()
        running.thread.join(timeout=30)
        assert running.result == [0]
        assert (settings.archive_dir / "a.npy").exists()

    def test_metrics_are_served_and_counted(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """With metrics_address, /metrics counts conversions and failures; /healthz is 200."""
        running = served_with_two_outcomes(make_service, settings)
        port = running.service.metrics.port
        assert port is not None
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            text = response.read().decode()
        assert "niftidrop_inputs_converted_total 1.0" in text
        assert 'niftidrop_inputs_failed_total{code="no_reference"} 1.0' in text
        assert "niftidrop_library_references 1.0" in text
        with urllib.request.urlopen(base + "/healthz", timeout=10) as response:
            assert response.status == 200

    def test_status_page_lists_the_outcomes(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """With metrics_address, /api/status lists what the service converted and failed,
        and names this host as its instance; the board's thread ends with the service."""
        running = served_with_two_outcomes(make_service, settings)
        port = running.service.metrics.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as reply:
            report = json.loads(reply.read())
        assert [entry["input"] for entry in report["recent"]] == ["a.npy"]
        assert [entry["input"] for entry in report["failed"]] == ["orphan.npy"]
        assert report["counts"]["archive"] == report["counts"]["failed"] == 1
        assert [item["host"] for item in report["instances"]] == [socket.gethostname()]
        running.service.request_stop()
        running.thread.join(timeout=30)
        assert "niftidrop-status" not in [thread.name for thread in threading.enumerate()]

    def test_second_service_on_the_same_spool_is_refused(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """The lease on the instance's name keeps a second one of that name away."""
        make_service()
        second = Service(settings, library=FakeLibrary(settings.root), metrics=Metrics())
        with pytest.raises(Exception, match="no live instance named"):
            second.run()


class TestOnce:
    def once(self, settings: Settings) -> tuple[int, list[dict[str, Any]]]:
        service = Service(
            settings, library=FakeLibrary(settings.root), convert_file=FakeConverter()
        )
        with capture_logs() as logs:
            code = service.run(once=True)
        return code, logs

    def test_all_converted_exits_0(self, settings: Settings) -> None:
        """--once converts every input present and returns 0."""
        for name in ("a.npy", "sub/b.npy"):
            drop(settings, name)
        code, logs = self.once(settings)
        assert code == 0
        assert sum(line["event"] == "input_converted" for line in logs) == 2

    def test_library_is_walked_once_and_not_watched(self, settings: Settings) -> None:
        """--once indexes the library once and sets up no watch."""
        library = FakeLibrary(settings.root)
        service = Service(settings, library=library, convert_file=FakeConverter())
        with capture_logs():
            assert service.run(once=True) == 0
        assert (library.builds, library.started) == (1, False)

    def test_a_failure_exits_1(self, settings: Settings) -> None:
        """--once returns 1 when some input was rejected."""
        drop(settings, "a.npy")
        drop(settings, "orphan.npy")
        code, _ = self.once(settings)
        assert code == 1

    def test_claimed_inputs_are_recovered(self, settings: Settings) -> None:
        """Inputs left claimed by a crash are finished by the next start."""
        from niftidrop.spool import Spool

        spool = Spool(settings)
        spool.create_folders()
        spool.claim(drop(settings, "a.npy"))
        code, logs = self.once(settings)
        assert code == 0
        assert (settings.archive_dir / "a.npy").exists()
        assert any(line["event"] == "spool_recovered" for line in logs)

    def test_incomplete_input_is_left_and_exits_1(self, settings: Settings) -> None:
        """An input still incomplete is not read, stays in the inbox, and gives 1;
        `service_stopped` counts it."""
        settings.inbox_dir.mkdir(parents=True)
        (settings.inbox_dir / "partial.npy").write_bytes(b"\x93NUMPY\x01\x00")
        code, logs = self.once(settings)
        assert code == 1
        assert (settings.inbox_dir / "partial.npy").exists()
        (incomplete,) = [line for line in logs if line["event"] == "input_incomplete"]
        assert incomplete["reason"].startswith("incomplete: 8 bytes")
        assert logs[-1]["event"] == "service_stopped"
        assert logs[-1]["incomplete"] == 1

    def test_a_crashing_conversion_fails_after_max_attempts_and_exits_1(
        self, settings: Settings
    ) -> None:
        """--once tries a conversion that raises an unexpected exception exactly
        `max_attempts` times, fails it as conversion_crashed, and returns 1."""
        drop(settings, "a.npy")
        converter = FakeConverter()
        converter.crashes = 100
        service = Service(
            settings.model_copy(update={"max_attempts": 2}),
            library=FakeLibrary(settings.root),
            convert_file=converter,
        )
        with capture_logs() as logs:
            assert service.run(once=True) == 1
        assert converter.calls == 2
        record = json.loads((settings.failed_dir / "a.npy.error.json").read_text())
        assert record["error"] == "conversion_crashed"
        assert "MemoryError: Unable to allocate" in record["message"]
        assert logs[-1]["event"] == "service_stopped"
        assert logs[-1]["failed"] == 1


class TestCrashes:
    """Guarantee 13: a crashing conversion is tried `max_attempts` times, then failed."""

    def test_an_unexpected_exception_is_retried_then_conversion_crashed(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """Every try raises: exactly `max_attempts` tries, `input_retrying` between them,
        then the input is in failed with `.error.json` saying conversion_crashed."""
        running = make_service(max_attempts=3)
        running.converter.crashes = 100
        drop(settings, "a.npy")
        error_json = settings.failed_dir / "a.npy.error.json"
        wait_until(error_json.exists)
        assert running.converter.calls == 3
        record = json.loads(error_json.read_text())
        assert record["error"] == "conversion_crashed"
        assert "each of 3 attempts" in record["message"]
        assert "a.npy" in record["message"]
        retries = running.events("input_retrying")
        assert [(line["attempt"], line["crashed"]) for line in retries] == [(1, True), (2, True)]
        assert not list(settings.state_path.glob("claimed/*/*.npy"))

    def test_a_crash_then_success_is_converted(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """A conversion that crashes once and then succeeds is converted, not failed."""
        running = make_service(max_attempts=2)
        running.converter.crashes = 1
        drop(settings, "a.npy")
        wait_until((settings.archive_dir / "a.npy").exists)
        assert running.converter.calls == 2
        assert not running.events("input_failed")

    def test_environmental_errors_do_not_count_as_crashes(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """More OSErrors in a row than `max_attempts` are still retried (guarantee 6)."""
        running = make_service(max_attempts=1)
        running.converter.environment_errors = 2
        drop(settings, "a.npy")
        wait_until((settings.archive_dir / "a.npy").exists)
        assert not running.events("input_failed")


class TestSpoolUnderfoot:
    """The spool changed under a running service: put back, or stop non-zero."""

    def test_a_removed_state_folder_is_made_again_with_its_lock(
        self, make_service: Callable[..., Running], settings: Settings
    ) -> None:
        """The state folder removed while running: claims folder and lease come back
        (held again: a second instance of the name is refused), and inputs are
        converted as before."""
        running = make_service()
        shutil.rmtree(settings.state_path)
        wait_until(lambda: bool(running.events("state_recreated")))
        with pytest.raises(ConfigError, match="no live instance named"):
            Spool(settings).lock()
        drop(settings, "a.npy")
        wait_until((settings.archive_dir / "a.npy").exists)

    @pytest.mark.parametrize("replacement", ["folder", "symlink"])
    def test_a_replaced_inbox_stops_the_service_and_its_watchdog(
        self, settings: Settings, tmp_path: Path, replacement: str
    ) -> None:
        """The inbox renamed away and made anew (a folder, or a symlink to the old
        one): ServiceError out of `run`, logged as service_failed, watchdog pings
        stop with the main loop."""
        notifier = FakeNotifier()
        service = Service(
            settings,
            library=FakeLibrary(tmp_path),
            convert_file=FakeConverter(),
            metrics=Metrics(),
            notifier=notifier,
        )
        raised: list[BaseException] = []

        def run() -> None:
            try:
                service.run()
            except BaseException as error:
                raised.append(error)

        with capture_logs() as logs:
            thread = threading.Thread(target=run)
            thread.start()
            wait_until(service.ready.is_set)
            wait_until(lambda: "WATCHDOG=1" in notifier.messages)
            settings.inbox_dir.rename(tmp_path / "old-inbox")
            if replacement == "folder":
                settings.inbox_dir.mkdir()
            else:
                settings.inbox_dir.symlink_to(tmp_path / "old-inbox")
            thread.join(timeout=30)
        assert [type(error) for error in raised] == [ServiceError]
        assert "replaced" in str(raised[0])
        (failed,) = [line for line in logs if line["event"] == "service_failed"]
        assert "inbox" in failed["error"]
        assert notifier.messages[-1] == "STOPPING=1"
        assert logs[-1]["event"] == "service_stopped"
