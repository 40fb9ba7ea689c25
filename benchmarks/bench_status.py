"""The status page under a big spool: request latency of `/` and `/api/status`.

A spool with ARCHIVE inputs in archive and FAILED in failed (each with its
`.error.json`, as the service leaves them) and RECENT conversions done by the
service itself, so the page is as full as it gets (the recent and failed lists at
their bounds). niftidrop runs as `python -m niftidrop run` with `metrics_address`
set; each request is a fresh HTTP connection from this process, timed from
connect to the last byte. The time the service takes to start on that spool
(its first count of every folder and the failed records read) is shown too.

    python -m benchmarks status            # or: python -m benchmarks.bench_status
    python -m benchmarks.bench_status --archive 10000 --failed 1000 --requests 200
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel
import numpy as np

from benchmarks.bench_service import Child

nib: Any = nibabel  # nibabel's functions carry no annotations

LATENCY_BAR = 0.050  # seconds: the 95th percentile of a request, each route
SHAPE = (16, 16, 8)
OPTIONS = (  # flag, default, meaning
    ("--archive", 10_000, "inputs in archive"),
    ("--failed", 1_000, "inputs in failed"),
    ("--recent", 50, "inputs the service converts"),
    ("--requests", 200, "requests per route"),
)


def build_spool(root: Path, archive: int, failed: int) -> None:
    """Folders as a long-running service leaves them, and one reference."""
    for folder in ("inbox", "outbox", "archive", "failed", "library"):
        (root / folder).mkdir(parents=True)
    reference = nib.Nifti1Image(np.zeros(SHAPE, np.int16), np.eye(4))
    nib.save(reference, root / "library" / "case.nii.gz")
    for index in range(archive):
        # Subfolders of 1,000, as sites or days would make them.
        folder = root / "archive" / f"batch{index // 1000:03d}"
        folder.mkdir(exist_ok=True)
        (folder / f"case_{index:05d}.npy").write_bytes(b"")
    for index in range(failed):
        name = f"orphan_{index:05d}.npy"
        (root / "failed" / name).write_bytes(b"")
        record = {
            "input": name,
            "error": "no_reference",
            "message": f"{name}: expected a reference keyed 'orphan_{index:05d}', found none",
            "failed_at": f"2026-01-01T00:{index // 60 % 60:02d}:{index % 60:02d}Z",
            "niftidrop_version": "bench",
        }
        (root / "failed" / f"{name}.error.json").write_text(json.dumps(record))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_service(root: Path, port: int) -> Child:
    """`python -m niftidrop run` on `root` with its status page on `port` (JSON logs:
    its stdout is a pipe)."""
    command = [sys.executable, "-m", "niftidrop", "run", "--root", str(root)]
    command += ["--metrics-address", f"127.0.0.1:{port}", "--settle-seconds", "0.1"]
    return Child(command, root)


def wait_for_count(service: Child, event: str, count: int, timeout: float = 300.0) -> None:
    """Until `count` log lines of `event` have come."""
    deadline = time.monotonic() + timeout
    while sum(f'"event": "{event}"' in line for line in list(service.lines)) < count:
        if time.monotonic() > deadline or service.process.poll() is not None:
            raise RuntimeError(f"{event} x{count} never came: {''.join(service.lines)[-2000:]}")
        time.sleep(0.01)


def request(port: int, path: str) -> tuple[float, bytes]:
    """Seconds for one GET on a fresh connection, and the body."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - started, body


def measure(root: Path, recent: int, requests: int) -> dict[str, Any]:
    port = free_port()
    started = time.perf_counter()
    service = start_service(root, port)
    try:
        service.wait_for('"service_ready"')
        startup = time.perf_counter() - started
        for index in range(recent):
            temporary = root / "inbox" / f".case_r{index:03d}.npy"  # hidden: not read
            np.save(temporary, np.ones(SHAPE, np.uint8))
            temporary.rename(root / "inbox" / f"case_r{index:03d}.npy")
        wait_for_count(service, "input_converted", recent)
        results: dict[str, Any] = {"startup_seconds": startup}
        for path in ("/", "/api/status"):
            request(port, path)  # warm
            timings, bodies = zip(*(request(port, path) for _ in range(requests)), strict=True)
            ordered = sorted(timings)
            results[path] = {
                "median": statistics.median(ordered),
                "p95": ordered[int(0.95 * (len(ordered) - 1))],
                "max": ordered[-1],
                "bytes": len(bodies[-1]),
            }
        status = json.loads(request(port, "/api/status")[1])
        results["counts"] = status["counts"]
        results["shown"] = {"recent": len(status["recent"]), "failed": len(status["failed"])}
    finally:
        service.stop()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Build the spool, time the page's requests, print the table and the bar."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_status")
    for flag, default, meaning in OPTIONS:
        parser.add_argument(flag, type=int, default=default, help=meaning)
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    args = parser.parse_args(argv)
    print(
        f"status page benchmark: {os.cpu_count()} CPUs, {args.archive:,} in archive, "
        f"{args.failed:,} in failed, {args.recent} converted, {args.requests} requests per route"
    )
    with tempfile.TemporaryDirectory(prefix="niftidrop-bench-") as temp:
        root = Path(temp)
        build_spool(root, args.archive, args.failed)
        results = measure(root, args.recent, args.requests)
    print(f"service start on that spool: {results['startup_seconds']:.2f} s")
    print(f"counts shown: {results['counts']}; rows: {results['shown']}")
    print("| route | median ms | p95 ms | max ms | bytes |")
    print("|---|---|---|---|---|")
    passed = True
    for path in ("/", "/api/status"):
        row = results[path]
        print(
            f"| `{path}` | {row['median'] * 1000:.1f} | {row['p95'] * 1000:.1f} "
            f"| {row['max'] * 1000:.1f} | {row['bytes']:,} |"
        )
        passed = passed and row["p95"] < LATENCY_BAR
    if args.json:
        print(json.dumps(results))
    verdict = "PASS" if passed else "FAIL"
    print(f"{verdict}  95th percentile under {LATENCY_BAR * 1000:.0f} ms on both routes")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
