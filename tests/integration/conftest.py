"""Fixtures for end-to-end tests (helpers live in support.py)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from support import ServiceProcess, ThreadedService, service_settings, write_reference


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A spool root with a library holding `case.nii.gz` (inputs `case*.npy` match it)."""
    write_reference(tmp_path / "library" / "case.nii.gz")
    (tmp_path / "inbox").mkdir()
    return tmp_path


@pytest.fixture
def start_service() -> Iterator[Callable[..., ThreadedService]]:
    """Start real services in threads; every one is stopped at the end of the test."""
    running: list[ThreadedService] = []
    with capture_logs() as logs:

        def start(root: Path, **overrides: Any) -> ThreadedService:
            service = ThreadedService(service_settings(root, **overrides), logs)
            running.append(service.start())
            return service

        yield start
        for service in running:
            if service.thread.is_alive():
                service.stop()


@pytest.fixture
def start_process() -> Iterator[Callable[..., ServiceProcess]]:
    """Start service subprocesses; any still running at the end is killed."""
    started: list[ServiceProcess] = []

    def start(root: Path, *args: str, env: dict[str, str] | None = None) -> ServiceProcess:
        process = ServiceProcess(root, *args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.send(signal.SIGKILL)
        process.wait()
        for stream in (process.process.stdout, process.process.stderr):
            if stream is not None:
                stream.close()
