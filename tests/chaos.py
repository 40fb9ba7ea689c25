"""Several instances on one spool under kills and pauses (README: Many instances, one
spool), for tests/integration/test_many_instances.py and the shared file systems.

`Chaos` runs real `niftidrop run` processes, each in its own process group (its
conversion processes with it), one per mount point of the spool; a producer drops
inputs in bursts, some of them bad, while instances are killed with SIGKILL (the
whole group) and started again, some at once and some after their lease expired,
and one is stopped with SIGSTOP past its lease and then continued (a zombie).
`audit` then checks the spool as a whole: every input exactly once in archive or
failed (by content), every output equal to its input, nothing claimed, no
temporary file, and what the logs said.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from niftidrop.names import is_temp_name
from waiting import wait_until

SHAPE = (6, 5, 4)
BAD_EVERY = 17  # one input in this many is not an array


def array_of(number: int) -> np.ndarray[Any, Any]:
    """Input `number`'s voxels: different for every number (so is its content)."""
    return (np.arange(int(np.prod(SHAPE)), dtype=np.uint16) + number).reshape(SHAPE)


def content_of(number: int) -> bytes:
    if number % BAD_EVERY == BAD_EVERY - 1:
        return f"not an array, number {number}".encode()
    buffer = io.BytesIO()
    np.save(buffer, array_of(number))
    return buffer.getvalue()


def write_reference(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), affine), path)


@dataclass
class Instance:
    """One instance's name, mount point, the process running it now and its logs."""

    name: str
    root: Path
    logs: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, settings: list[str]) -> None:
        self.starts += 1
        log = (self.logs / f"{self.name}.{self.starts}.log").open("wb")
        command = [sys.executable, "-m", "niftidrop", "run", "--root", str(self.root)]
        command += ["--instance", self.name, "--log-format", "json", *settings]
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def signal_group(self, signum: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(timeout=30)

    def ready(self) -> bool:
        """Whether the process started last has said `service_ready` (or ended)."""
        assert self.process is not None
        log = self.logs / f"{self.name}.{self.starts}.log"
        return self.process.poll() is not None or b'"service_ready"' in log.read_bytes()

    def claims_held(self, state: Path) -> int:
        """Inputs in this instance's claim folders now."""
        folder = state / "instances" / self.name / "claimed"
        return sum(1 for path in folder.rglob("*") if path.is_file() and path.name[0] != ".")


@dataclass
class Report:
    inputs: int = 0
    kills: int = 0
    kills_without_restart: int = 0
    zombies: int = 0
    seconds: float = 0.0
    events: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


class Chaos:
    """`len(roots)` instances, instance i on mount point `roots[i]` of one spool."""

    def __init__(
        self, roots: list[Path], logs: Path, *, lease_timeout: float = 3.0, hooked: bool = False
    ) -> None:
        self.roots = roots
        # With `hooked`, every finish runs a hook that notes the input's name here.
        self.hook_log = logs / "hooked.txt" if hooked else None
        self.spool = roots[0]
        self.lease_timeout = lease_timeout
        self.settings = [
            "--settle-seconds", "0.1",
            "--heartbeat-interval", str(lease_timeout / 6),
            "--lease-timeout", str(lease_timeout),
            "--rescan-interval", "1",
            "--workers", "1",
            "--shutdown-timeout", "20",
        ]  # fmt: skip
        if self.hook_log is not None:
            note = ["sh", "-c", f'printf "%s\\n" "$NIFTIDROP_INPUT" >> {self.hook_log}']
            for flag in ("--on-converted", "--on-failed"):
                self.settings += [flag, json.dumps(note)]
        logs.mkdir(parents=True, exist_ok=True)
        self.instances = [
            Instance(f"node-{number}", root, logs) for number, root in enumerate(roots, 1)
        ]
        self.report = Report()
        self.random = random.Random(20261202)
        self.dropped = 0

    def run(self, inputs: int, *, bursts: int, kills: int, zombie: bool = True) -> Report:
        write_reference(self.spool / "library" / "case.nii.gz")
        (self.spool / "inbox").mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        for instance in self.instances:
            instance.start(self.settings)
        producer = threading.Thread(target=self._produce, args=(inputs, bursts), daemon=True)
        producer.start()
        try:
            self._havoc(kills, zombie)
            producer.join(timeout=600)
            for instance in self.instances:  # every instance running, none paused
                assert instance.process is not None
                if instance.process.poll() is not None:
                    instance.start(self.settings)
            deadline = time.monotonic() + 600
            while not self._finished(inputs):  # a slow poll: it lists the whole spool
                assert time.monotonic() < deadline, "timed out waiting for every input"
                time.sleep(0.5)
        finally:
            self._stop_all()
        self.report.inputs = inputs
        self.report.seconds = time.monotonic() - started
        self._read_logs()
        return self.report

    def _produce(self, inputs: int, bursts: int) -> None:
        """Drop `inputs` in `bursts`, each written under a hidden name and renamed in,
        with a pause between bursts."""
        inbox = self.spool / "inbox"
        size = -(-inputs // bursts)
        for start in range(0, inputs, size):
            for number in range(start, min(inputs, start + size)):
                temporary = inbox / f".case_{number:05d}.npy.part"
                temporary.write_bytes(content_of(number))
                temporary.rename(inbox / f"case_{number:05d}.npy")
                self.dropped = number + 1
            time.sleep(self.random.uniform(0.5, 2.0))

    def _havoc(self, kills: int, zombie: bool) -> None:
        """`kills` kills of random instances while inputs arrive, and one zombie."""
        zombie_at = 1 if zombie else -1
        for number in range(kills):
            time.sleep(self.random.uniform(0.5, 1.5))
            candidates = self.instances
            if number == zombie_at:
                self._make_zombie()
                time.sleep(2)  # time to find its claims lost, before any kill
                candidates = self.instances[:-1]
            victim = self.random.choice(candidates)
            victim.kill()
            self.report.kills += 1
            if number % 3 == 2:  # dead past its lease: the others adopt its claims
                self.report.kills_without_restart += 1
                time.sleep(self.lease_timeout + 1.5)
            victim.start(self.settings)

    def _make_zombie(self) -> None:
        """SIGSTOP an instance while it holds claims, past its lease; then SIGCONT."""
        state = self.spool / "inbox" / ".niftidrop"
        zombie = self.instances[-1]
        inbox = self.spool / "inbox"
        for _ in range(400):
            if sum(1 for p in inbox.iterdir() if p.name[0] != ".") < 5:
                time.sleep(0.05)  # between bursts: wait for the next one
                continue
            zombie.signal_group(signal.SIGSTOP)
            if zombie.claims_held(state):
                break
            zombie.signal_group(signal.SIGCONT)
            time.sleep(0.05)
        else:
            self.report.problems.append("the zombie never held a claim when stopped")
            return
        self.report.zombies += 1
        time.sleep(2 * self.lease_timeout + 2)  # the others' heartbeats adopt its claims
        zombie.signal_group(signal.SIGCONT)

    def _finished(self, inputs: int) -> bool:
        done = self._moved_inputs()
        inbox = [p for p in (self.spool / "inbox").iterdir() if not p.name.startswith(".")]
        if len(done) < inputs or inbox or self._claimed():
            return False
        return self.hook_log is None or len(set(self._hooked())) >= inputs

    def _hooked(self) -> list[str]:
        """The inputs the hook was run for, once per delivery."""
        assert self.hook_log is not None
        try:
            return self.hook_log.read_text().split()
        except FileNotFoundError:
            return []

    def _moved_inputs(self) -> list[Path]:
        found = []
        for folder in (self.spool / "archive", self.spool / "failed"):
            if folder.is_dir():
                found += [
                    path
                    for path in folder.rglob("*")
                    if path.is_file()
                    and not path.name.endswith(".error.json")
                    and not path.name.startswith(".")
                ]
        return found

    def _claimed(self) -> list[Path]:
        state = self.spool / "inbox" / ".niftidrop"
        return [
            path
            for path in state.glob("instances/*/claimed/**/*")
            if path.is_file() and not path.name.startswith(".")
        ]

    def _stop_all(self) -> None:
        """SIGTERM each instance once it is ready (before that, SIGTERM's default
        action ends a process still starting), and wait for each to stop."""
        for instance in self.instances:
            with contextlib.suppress(AssertionError):
                wait_until(instance.ready, 60, f"{instance.name} ready")
        for instance in self.instances:
            if instance.process is not None and instance.process.poll() is None:
                instance.signal_group(signal.SIGCONT)
                instance.process.send_signal(signal.SIGTERM)
        for instance in self.instances:
            if instance.process is None:
                continue
            try:
                code = instance.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                instance.kill()
                code = -9
            if code not in (0, -signal.SIGKILL):
                self.report.problems.append(f"{instance.name} stopped with exit code {code}")

    def _read_logs(self) -> None:
        for instance in self.instances:
            for log in sorted(instance.logs.glob(f"{instance.name}.*.log")):
                for line in log.read_text(errors="replace").splitlines():
                    if line.startswith("{"):
                        with contextlib.suppress(json.JSONDecodeError):
                            self.report.events[json.loads(line).get("event", "")] += 1

    def audit(self) -> list[str]:
        """Everything that is not as the guarantees say."""
        problems = list(self.report.problems)
        if self.hook_log is not None:
            hooked = set(self._hooked())
            problems += [
                f"case_{number:05d}: its event was never delivered"
                for number in range(self.dropped)
                if f"case_{number:05d}.npy" not in hooked
            ]
        expected = {hashlib.sha256(content_of(n)).hexdigest(): n for n in range(self.dropped)}
        found = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in self._moved_inputs())
        for digest, number in expected.items():
            if found[digest] != 1:
                problems.append(f"case_{number:05d}: {found[digest]} times in archive or failed")
        problems += [f"unknown file in archive or failed: {d}" for d in found if d not in expected]
        for number in range(self.dropped):
            name = f"case_{number:05d}"
            bad = number % BAD_EVERY == BAD_EVERY - 1
            output = self.spool / "outbox" / f"{name}.nii.gz"
            if bad:
                if not list((self.spool / "failed").glob(f"{name}*.error.json")):
                    problems.append(f"{name}: failed without an error file")
                if output.exists():
                    problems.append(f"{name}: a bad input has an output")
            elif not output.exists():
                problems.append(f"{name}: no output")
            elif not np.array_equal(np.asarray(nib.load(output).dataobj), array_of(number)):
                problems.append(f"{name}: its output differs from its input")
        images = sorted(p.name for p in (self.spool / "outbox").glob("*.nii.gz"))
        good = [n for n in range(self.dropped) if n % BAD_EVERY != BAD_EVERY - 1]
        if images != [f"case_{number:05d}.nii.gz" for number in good]:
            problems.append(f"the outbox holds {len(images)} images for {len(good)} inputs")
        problems += [f"left claimed: {path}" for path in self._claimed()]
        problems += [
            f"temporary left: {path}"
            for path in self.spool.rglob("*")
            if path.is_file() and is_temp_name(path.name)
        ]
        return problems
