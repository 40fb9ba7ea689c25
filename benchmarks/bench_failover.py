"""Failover: how long a dead instance's claims wait before a survivor finishes them.

Each trial is a spool of its own served by two instances, `victim` and
`survivor` (`python -m niftidrop run`, each in its own process group). Inputs
arrive; once the victim holds claims, its whole process group is killed with
SIGKILL, at a random moment of its heartbeat cycle. The trial measures, from the
kill, the time until every input the victim held is in archive and released
(finished by the survivor, which must adopt it first: the victim is not
restarted). The bar: within `lease_timeout` + `rescan_interval`; expected: at
most `lease_timeout` + `heartbeat_interval` (the survivor's next look) and a
conversion, since the victim's lease was renewed at most a heartbeat before.

Trials run side by side (each waits out a lease, mostly idle), `--trials` for
each setting: the defaults (lease_timeout 60 s), and lease_timeout = 10 s.

    python -m benchmarks failover            # or: python -m benchmarks.bench_failover
    python -m benchmarks.bench_failover --trials 10 --lease-timeouts 60 10
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from niftidrop.settings import load_settings

SHAPE = (128, 128, 64)  # float32, 4 MiB: a claim lasts long enough to be seen
MAX_INPUTS = 200  # per trial: inputs arrive until the victim holds a claim


def _start(root: Path, name: str, lease_timeout: float) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "niftidrop", "run", "--root", str(root)]
    command += ["--instance", name, "--workers", "1", "--log-format", "json"]
    command += ["--lease-timeout", str(lease_timeout)]
    log = (root / f"{name}.log").open("wb")
    try:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        log.close()


def _ready(root: Path, name: str) -> bool:
    return b'"service_ready"' in (root / f"{name}.log").read_bytes()


def _held(claimed: Path) -> list[str]:
    """The inputs in a claims folder now (their names)."""
    return sorted(p.name for p in claimed.rglob("*") if p.is_file() and p.name[0] != ".")


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def trial(folder: Path, lease_timeout: float, heartbeat_interval: float) -> float:
    """One kill: the seconds from it until the victim's claims are all in archive."""
    root = folder
    (root / "inbox").mkdir(parents=True)
    (root / "library").mkdir()
    reference = nib.Nifti1Image(np.zeros(SHAPE, np.int16), np.eye(4))
    nib.save(reference, root / "library" / "case.nii.gz")
    processes = {name: _start(root, name, lease_timeout) for name in ("victim", "survivor")}
    try:
        _wait(lambda: all(_ready(root, name) for name in processes), 120, "both ready")
        # Killed at a random moment of its heartbeat cycle, not just after its start.
        time.sleep(random.uniform(0, 2 * heartbeat_interval))
        claimed = root / "inbox" / ".niftidrop" / "instances" / "victim" / "claimed"
        for number in range(MAX_INPUTS):  # inputs arrive until the victim holds some
            buffer = io.BytesIO()
            np.save(buffer, np.random.default_rng(number).random(SHAPE, dtype=np.float32))
            part = root / "inbox" / f".case_{number}.part"
            part.write_bytes(buffer.getvalue())
            part.rename(root / "inbox" / f"case_{number}.npy")
            if _held(claimed):
                break
        _wait(lambda: _held(claimed), 120, "the victim to hold a claim")
        os.killpg(processes["victim"].pid, signal.SIGKILL)
        killed = time.monotonic()
        held = _held(claimed)
        processes["victim"].wait()
        archive, survivor = root / "archive", claimed.parent.parent / "survivor" / "claimed"

        def finished() -> bool:
            # Adopted (gone from the victim's claims), archived, and released: an
            # input linked into archive just before the kill is not finished yet.
            in_flight = set(_held(claimed)) | set(_held(survivor))
            return all((archive / name).exists() and name not in in_flight for name in held)

        _wait(finished, 600, "the adoption")
        return time.monotonic() - killed
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_failover")
    parser.add_argument("--trials", type=int, default=10, help="kills per setting")
    parser.add_argument("--lease-timeouts", type=float, nargs="+", default=[60.0, 10.0])
    args = parser.parse_args(argv)
    defaults = load_settings()
    print(
        f"failover benchmark: {os.cpu_count()} CPUs, {args.trials} kills per setting, "
        f"heartbeat_interval {defaults.heartbeat_interval:g} s, "
        f"rescan_interval {defaults.rescan_interval:g} s, inputs of {SHAPE} float32"
    )
    print("| lease_timeout | kills | min s | median s | max s | bar s |")
    print("|---|---|---|---|---|---|")
    passed = True
    for lease in args.lease_timeouts:
        with (
            tempfile.TemporaryDirectory(prefix="niftidrop-failover-") as temp,
            concurrent.futures.ThreadPoolExecutor(args.trials) as pool,
        ):
            beat = defaults.heartbeat_interval
            futures = [
                pool.submit(trial, Path(temp) / f"trial-{number}", lease, beat)
                for number in range(args.trials)
            ]
            seconds = sorted(future.result() for future in futures)
        bar = lease + defaults.rescan_interval
        passed = passed and seconds[-1] <= bar
        print(
            f"| {lease:g} | {len(seconds)} | {seconds[0]:.1f} | {statistics.median(seconds):.1f} "
            f"| {seconds[-1]:.1f} | {bar:g} |"
        )
    verdict = "PASS" if passed else "FAIL"
    print(f"{verdict}  a dead instance's claims finished within lease_timeout + rescan_interval")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
