"""Throughput on a shared file system: one instance against two on one spool.

A spool on GlusterFS (`deploy/sharedfs.sh`, two mounts: two clients, as two hosts
would have) holds INPUTS 64³ uint8 label maps in its inbox; `niftidrop run
--once` converts them, timed from its start to its exit: one instance on the first
mount, then (a fresh spool) two at once, one per mount, with names of their own.
The same single instance on a local folder gives this machine's CPU-bound
ceiling: two instances on one host share its CPUs, so a second *host* is what
adds capacity. Needs root (mounts, network namespaces).

    python -m benchmarks sharedfs            # or: python -m benchmarks.bench_sharedfs
    python -m benchmarks.bench_sharedfs --inputs 1000
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

ON_REQUEST = True  # brings up GlusterFS as root: only when named
SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "sharedfs.sh"
SHAPE = (64, 64, 64)


@contextmanager
def gluster(folder: Path) -> Iterator[list[Path]]:
    """Two mounts of a new GlusterFS volume whose server lives in `folder`."""
    started = subprocess.run(
        ["bash", str(SCRIPT), "up", "gluster", str(folder), "2"],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    try:
        yield [Path(line) for line in started.stdout.split()]
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(folder)], check=True, timeout=120)


def fill(root: Path, inputs: int) -> None:
    """A reference and `inputs` label maps in the inbox, each renamed in whole."""
    (root / "inbox").mkdir(parents=True)
    (root / "library").mkdir()
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), affine), root / "library" / "case.nii.gz")
    rng = np.random.default_rng(0)
    for number in range(inputs):
        buffer = io.BytesIO()
        np.save(buffer, rng.integers(0, 5, SHAPE, dtype=np.uint8))
        part = root / "inbox" / f".case_{number:04d}.part"
        part.write_bytes(buffer.getvalue())
        part.rename(root / "inbox" / f"case_{number:04d}.npy")


def convert_all(roots: list[Path]) -> float:
    """`run --once` on every root at once (instance i on roots[i]); seconds until
    the last exits."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "niftidrop", "run", "--once", "--log-format", "json"]
    processes = [
        subprocess.Popen(
            [*command, "--root", str(root), "--instance", f"node-{number}"],
            stdout=subprocess.DEVNULL,
        )
        for number, root in enumerate(roots)
    ]
    codes = [process.wait(timeout=3600) for process in processes]
    seconds = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"run --once exited {codes}")
    return seconds


def count(folder: Path) -> int:
    return sum(1 for path in folder.iterdir() if path.name.endswith(".npy"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_sharedfs")
    parser.add_argument("--inputs", type=int, default=1000, help="64³ label maps per run")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_sharedfs needs root (it mounts GlusterFS): skipped")
        return 0
    print(f"shared file system benchmark: {os.cpu_count()} CPUs, {args.inputs} 64³ label maps")
    print("| spool | instances | seconds | files/s |")
    print("|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory(prefix="niftidrop-sharedfs-") as temp:
        local = Path(temp) / "local"
        fill(local, args.inputs)
        rows.append(("local folder", 1, convert_all([local]), count(local / "archive")))
        for instances in (1, 2):
            with gluster(Path(temp) / f"gluster-{instances}") as mounts:
                fill(mounts[0], args.inputs)
                seconds = convert_all(mounts[:instances])
                rows.append(("GlusterFS", instances, seconds, count(mounts[0] / "archive")))
    for spool, instances, seconds, archived in rows:
        if archived != args.inputs:
            print(f"FAIL  {spool}, {instances}: {archived} of {args.inputs} in archive")
            return 1
        print(f"| {spool} | {instances} | {seconds:.1f} | {args.inputs / seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
