"""Helpers of the end-to-end tests: spools on temporary folders, the service in a
thread or as a subprocess, and polling with a deadline (never fixed sleeps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from niftidrop.service import Service
from niftidrop.settings import Settings, load_settings
from waiting import wait_until

SHAPE = (6, 5, 4)


def write_reference(path: Path, shape: tuple[int, ...] = SHAPE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.array([[0, -1.5, 0, 10], [2.0, 0, 0, -4], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), affine), path)
    return path


def prediction(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray[Any, Any]:
    """A label map whose voxels depend on `seed`, so outputs can be told apart."""
    return ((np.arange(int(np.prod(shape))) + seed) % 7).astype(np.uint8).reshape(shape)


def save_npy(path: Path, array: np.ndarray[Any, Any]) -> Path:
    """np.save to exactly `path` (np.save itself appends .npy to other names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.save(handle, array)
    return path


def drop_by_rename(inbox: Path, relative: str, array: np.ndarray[Any, Any]) -> Path:
    """The recommended producer: write a hidden temporary name, then rename it in."""
    final = inbox / relative
    temporary = save_npy(final.with_name(f".{final.name}.tmp"), array)
    temporary.rename(final)
    return final


def output_of(root: Path, relative: str) -> np.ndarray[Any, Any]:
    stem = relative.rsplit(".", 1)[0]
    image = nib.load(root / "outbox" / f"{stem}.nii.gz")
    return np.asarray(image.dataobj)


def files_in(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def service_settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "root": root,
        "settle_seconds": 0.3,
        "heartbeat_interval": 0.5,
        "workers": 2,
        "shutdown_timeout": 20,
    }
    values.update(overrides)
    return load_settings(**values)


class ThreadedService:
    """The real service (real library and conversion) running in a thread."""

    def __init__(self, settings: Settings, logs: list[dict[str, Any]]) -> None:
        self.settings = settings
        self.logs = logs
        self.service = Service(settings)
        self.exit_codes: list[int] = []
        self.thread = threading.Thread(target=self._run, name="service-under-test")

    def _run(self) -> None:
        self.exit_codes.append(self.service.run())

    def start(self) -> ThreadedService:
        self.thread.start()
        wait_until(lambda: self.service.ready.is_set() or not self.thread.is_alive())
        assert self.service.ready.is_set(), "the service did not start"
        return self

    def stop(self) -> int:
        self.service.request_stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        return self.exit_codes[0]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in list(self.logs) if line.get("event") == name]


def conversion_processes(parent: int) -> list[int]:
    """Running `niftidrop.conversion_child` processes started by `parent` (found in /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        # The command line ends "-m niftidrop.conversion_child <parent pid>" (and a NUL).
        if command[-3:-1] == [b"niftidrop.conversion_child", str(parent).encode()] and state != "Z":
            found.append(int(entry.name))
    return found


class ServiceProcess:
    """`python -m niftidrop run` as a child process; its JSON log lines are parsed."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        environment = {**os.environ, "NIFTIDROP_LOG_FORMAT": "json", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "niftidrop", "run", "--root", str(root), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr.extend(self.process.stderr)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def wait_ready(self, timeout: float = 60) -> ServiceProcess:
        wait_until(
            lambda: self.events("service_ready") or self.process.poll() is not None,
            timeout,
            "service_ready",
        )
        assert self.events("service_ready"), "".join(self.stderr)
        return self

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def children(self) -> list[int]:
        """Process ids of its conversion processes still running."""
        return conversion_processes(self.process.pid)

    def kill(self) -> None:
        self.process.kill()
        self.wait()

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code
