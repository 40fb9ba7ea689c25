"""Guarantee 13 with real conversion processes: killed, timed out, or waiting at a stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import (
    ServiceProcess,
    ThreadedService,
    conversion_processes,
    drop_by_rename,
    files_in,
    prediction,
    write_reference,
)

from fifos import wait_for_reader
from spools import instance_folder
from waiting import wait_until

FAST = ["--settle-seconds", "0.3", "--heartbeat-interval", "0.5"]
INPUT_EVENTS = ("input_converted", "input_failed", "input_retrying", "input_deferred")


def fifo_reference(root: Path) -> Path:
    """The library's `case.nii.gz`, a symlink to a real image (so it is indexed)
    whose target then becomes a FIFO: a conversion opening it waits for ever."""
    library = root / "library"
    (library / "case.nii.gz").unlink()
    target = write_reference(root / "elsewhere" / "case.nii.gz")
    (library / "case.nii.gz").symlink_to(target)
    return target


def make_fifo(target: Path) -> None:
    target.unlink()
    os.mkfifo(target)


def reader_of(fifo: Path, timeout: float = 30.0) -> int:
    """The conversion process of this test's service that has `fifo` open."""
    found: list[int] = []

    def look() -> bool:
        for pid in conversion_processes(os.getpid()):
            with contextlib.suppress(OSError):
                if any(fd.readlink() == fifo for fd in Path(f"/proc/{pid}/fd").iterdir()):
                    found.append(pid)
                    return True
        return False

    wait_until(look, timeout, f"a conversion process reading {fifo}")
    return found[0]


def error_record(root: Path, name: str) -> dict[str, object]:
    record: dict[str, object] = json.loads((root / "failed" / f"{name}.error.json").read_text())
    return record


class TestCrashedConversions:
    def test_a_conversion_killed_every_time_fails_after_max_attempts(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Its process killed on each try (SIGKILL, then SIGSEGV): exactly
        `max_attempts` tries, then conversion_crashed naming the signal; the fault
        report of the child is a log line."""
        target = fifo_reference(root)
        service = start_service(root, workers=1, max_attempts=2)
        make_fifo(target)
        drop_by_rename(root / "inbox", "case_1.npy", prediction(1))
        for signum in (signal.SIGKILL, signal.SIGSEGV):
            writer = wait_for_reader(target)  # a conversion process is in the call
            child = reader_of(target)
            os.kill(child, signum)
            os.close(writer)
            wait_until(lambda child=child: child not in conversion_processes(os.getpid()))
        wait_until((root / "failed" / "case_1.npy.error.json").exists, what="error.json")
        record = error_record(root, "case_1.npy")
        assert record["error"] == "conversion_crashed"
        assert "each of 2 attempts" in str(record["message"])
        assert "(killed by SIGSEGV)" in str(record["message"])
        (retrying,) = service.events("input_retrying")
        assert "(killed by SIGKILL)" in retrying["error"]
        reports = service.events("conversion_process_output")
        assert any("Segmentation fault" in line["output"] for line in reports)
        assert files_in(root / "failed") == ["case_1.npy", "case_1.npy.error.json"]

    def test_a_conversion_over_its_time_is_killed_and_counted(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """A reference that never delivers (its target swapped for a FIFO): each try
        is killed after `conversion_timeout`; after `max_attempts` it fails."""
        target = fifo_reference(root)
        service = start_service(root, workers=1, max_attempts=2, conversion_timeout=0.5)
        make_fifo(target)
        drop_by_rename(root / "inbox", "case_1.npy", prediction(1))
        wait_until((root / "failed" / "case_1.npy.error.json").exists, 30, "error.json")
        record = error_record(root, "case_1.npy")
        assert record["error"] == "conversion_crashed"
        assert "killed after 0.5 s (conversion_timeout)" in str(record["message"])
        assert len(service.events("input_retrying")) == 1


class TestStopWhileWaiting:
    def test_a_stop_cancels_the_wait_for_a_reference(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """A job waiting `reference_wait` for its reference when the stop comes: the
        stop is prompt, the input stays claimed, and nothing is logged about it."""
        service = start_service(root, workers=1, reference_wait=60, shutdown_timeout=30)
        drop_by_rename(root / "inbox", "orphan_1.npy", prediction(1))
        claims = instance_folder(root) / "claimed"
        wait_until(lambda: list(claims.glob("*/orphan_1.npy")), what="the claim")
        started = time.monotonic()
        assert service.stop() == 0
        assert time.monotonic() - started < 10
        assert files_in(root / "failed") == []
        assert [path.name for path in claims.glob("*/*.npy")] == ["orphan_1.npy"]
        events = [line["event"] for line in service.logs]
        assert events[-1] == "service_stopped"
        assert not [event for event in events if event in INPUT_EVENTS]


class TestForcedStop:
    @pytest.mark.parametrize("attempt", range(3))
    def test_a_second_sigint_during_conversions_is_quiet(
        self, root: Path, start_process: Callable[..., ServiceProcess], attempt: int
    ) -> None:
        """Two SIGINTs while every worker converts (stuck on a FIFO reference): one
        service_stopping, no traceback, nothing about an input, service_stopped last,
        the inputs left claimed."""
        target = fifo_reference(root)
        process = start_process(root, *FAST, "--workers", "2").wait_ready()
        make_fifo(target)
        for number in (1, 2):
            drop_by_rename(root / "inbox", f"case_{number}.npy", prediction(number))
        claims = instance_folder(root) / "claimed"
        wait_until(lambda: len(list(claims.glob("*/*.npy"))) == 2, what="two claims")
        writer = wait_for_reader(target)
        process.send(signal.SIGINT)
        wait_until(lambda: process.events("service_stopping"), what="service_stopping")
        process.send(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        os.close(writer)
        events = [line["event"] for line in process.lines]
        assert events.count("service_stopping") == 1
        assert events[-1] == "service_stopped"
        assert not [event for event in events if event in (*INPUT_EVENTS, "job_crashed")]
        assert "Traceback" not in "".join(process.stderr)
        assert len(list(claims.glob("*/*.npy"))) == 2
