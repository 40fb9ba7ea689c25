"""The service end to end: niftidrop against the watcher a user would write instead.

The baseline is the obvious script: a watchdog handler that, for each new file,
globs the library for its reference, calls nidataset's `numpy_to_nifti` (plain
nibabel when nidataset is missing) and moves the input to an archive folder, one
file at a time. niftidrop runs as `python -m niftidrop run` with its defaults
(fsync on, one worker per CPU; `--workers` sets another count). Both run as child
processes on fresh folders.

1. Throughput: FILES 64³ uint8 label maps, each with its reference, renamed into
   the inbox at once; from the first rename to the last input archived.
2. Latency: isolated drops (written elsewhere, renamed in); from the rename to
   the output being visible in the outbox. The baseline pays watchdog's pairing
   delay: each archive move is a move out of the watched folder, held 0.5 s.
3. Idle CPU of the running service over IDLE seconds, from /proc/<pid>/stat.
4. Hooks: the throughput run again with `on_converted = ["true"]` (a hook that exits
   at once), in the same rounds; its wall time to the last input archived against
   niftidrop's without a hook, and the time to the last hook run.
5. The durable-work limit: the throughput run again, in the same rounds, by a pool
   of one process per CPU that does only what no service can skip for an input
   (see `durable_work`); niftidrop's files per second against it.

    python -m benchmarks service            # or: python -m benchmarks.bench_service
    python -m benchmarks.bench_service --files 200 --drops 10 --idle 5
    python -m benchmarks.bench_service --workers 4   # niftidrop with 4 workers
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import isal.igzip
import nibabel
import numpy as np

from niftidrop.writer import fsync_folder

nib: Any = nibabel  # nibabel's functions carry no annotations

THROUGHPUT_BAR = 2.0  # niftidrop at least this many times the baseline's files per second
LATENCY_BAR = 0.025  # median seconds from rename to visible output
IDLE_CPU_BAR = 0.01  # fraction of one core while idle
HOOK_BAR = 1.05  # wall time with a hook that exits at once, at most this times without
LIMIT_BAR = 0.85  # niftidrop's files per second, at least this share of the durable-work limit
HOOK = ["--on-converted", json.dumps(["true"])]
SHAPE = (64, 64, 64)


# Inputs.


def label_map(seed: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A 64³ label map with a few blobs, different for every seed."""
    axis = np.linspace(-1.0, 1.0, SHAPE[0], dtype=np.float32)
    x, y, z = axis[:, None, None], axis[None, :, None], axis[None, None, :]
    shift = (seed % 17) / 40.0
    radius = np.sqrt((x - shift) ** 2 + y * y + (z + shift) ** 2)
    return np.minimum(radius * 5.0, 4.0).astype(np.uint8)


def build_spool(root: Path, files: int) -> Path:
    """A library of `files` references and `files` predictions in root/staging."""
    library = root / "library"
    staging = root / "staging"
    library.mkdir(parents=True)
    staging.mkdir()
    affine = np.diag([0.8, 0.8, 1.2, 1.0])
    affine[:3, 3] = [-90.0, -110.0, 30.0]
    template = library / "template.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), affine), template)
    for index in range(files):
        shutil.copyfile(template, library / f"case{index:04d}.nii.gz")
        np.save(staging / f"case{index:04d}.npy", label_map(index))
    template.unlink()
    return staging


def fresh_root(parent: Path, name: str, source: Path) -> tuple[Path, Path]:
    """A spool root sharing the library and hard-linked copies of the predictions."""
    root = parent / name
    (root / "inbox").mkdir(parents=True)
    (root / "library").symlink_to(source.parent / "library")
    staging = root / "staging"
    staging.mkdir()
    for path in source.iterdir():
        os.link(path, staging / path.name)
    return root, staging


# The services under test.


class Child:
    """A service process whose stdout lines are collected by a thread."""

    def __init__(self, command: list[str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.lines)):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{text!r} never appeared: {''.join(self.lines)[-2000:]}")
            time.sleep(0.01)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)
        self._reader.join(timeout=10)


def start_niftidrop(root: Path, *extra: str) -> Child:
    command = [sys.executable, "-m", "niftidrop", "run", "--log-format", "json", *extra]
    child = Child(command, root)
    child.wait_for('"service_ready"')
    return child


def start_baseline(root: Path) -> Child:
    command = [sys.executable, "-m", "benchmarks.bench_service", "--baseline", str(root)]
    child = Child(command, Path(__file__).resolve().parent.parent)
    child.wait_for("watching")
    return child


def baseline(root: Path) -> None:
    """What a user writes instead of niftidrop (runs in the baseline child)."""
    import glob

    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    try:
        from nidataset.transforms import numpy_to_nifti
    except ImportError:  # the same thing with nibabel

        def numpy_to_nifti(npy_path: str, output_path: str, reference_nifti: str) -> str:
            reference = nib.load(reference_nifti)
            out = Path(output_path) / (Path(npy_path).stem + ".nii.gz")
            nib.save(nib.Nifti1Image(np.load(npy_path), reference.affine, reference.header), out)
            return str(out)

    inbox, outbox, archive = root / "inbox", root / "outbox", root / "archive"
    outbox.mkdir(exist_ok=True)
    archive.mkdir(exist_ok=True)

    class Convert(FileSystemEventHandler):
        def on_created(self, event: FileSystemEvent) -> None:
            self.convert(os.fsdecode(event.src_path))

        def on_moved(self, event: FileSystemEvent) -> None:
            self.convert(os.fsdecode(event.dest_path))

        def convert(self, path: str) -> None:
            if not path.endswith(".npy") or not Path(path).exists():
                return
            key = Path(path).stem
            # The one-liner users reach for; it lists the whole library for every file.
            found = glob.glob(str(root / "library" / "**" / f"{key}*.nii*"), recursive=True)  # noqa: PTH207
            numpy_to_nifti(path, str(outbox), reference_nifti=found[0])
            shutil.move(path, archive / Path(path).name)

    observer = Observer()
    observer.schedule(Convert(), str(inbox), recursive=True)
    observer.start()
    print("watching", flush=True)
    try:
        while observer.is_alive():
            observer.join(1)
    except KeyboardInterrupt:
        pass
    observer.stop()
    observer.join()


# The durable-work limit.


def durable_work(root: str, names: Sequence[str]) -> None:
    """Convert and archive `names` (in root/inbox) doing only the work none can skip.

    Per input: claim it (rename out of the inbox), read it, read its reference's
    header, gzip header and data (ISA-L at niftidrop's default level), write the
    output under a temporary name, fsync it, rename it into the outbox, fsync the
    outbox, link the input into the archive, fsync the archive, unlink the claimed
    name. No watching, no logging, no records, no checks.
    """
    spool = Path(root)
    claimed, outbox, archive = spool / "claimed", spool / "outbox", spool / "archive"
    for name in names:
        stem = name.removesuffix(".npy")
        claim = claimed / name
        (spool / "inbox" / name).rename(claim)
        data = np.load(claim)
        header = nib.load(spool / "library" / f"{stem}.nii.gz").header.copy()
        header.set_data_shape(data.shape)
        header.set_data_dtype(data.dtype)
        header["vox_offset"] = 352
        blob = header.binaryblock + bytes(4) + data.tobytes(order="F")
        temp = outbox / f".{stem}.tmp"
        with temp.open("xb") as file:
            file.write(isal.igzip.compress(blob, compresslevel=1))
            file.flush()
            os.fsync(file.fileno())
        temp.rename(outbox / f"{stem}.nii.gz")
        fsync_folder(outbox)
        (archive / name).hardlink_to(claim)
        fsync_folder(archive)
        claim.unlink()


class DurableLimit:
    """A pool of one process per CPU doing `durable_work`, started (and warm) before
    the clock starts, as a service is."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for folder in ("claimed", "outbox", "archive"):
            (root / folder).mkdir()
        self.processes = os.cpu_count() or 1
        self.pool = multiprocessing.get_context("spawn").Pool(self.processes)
        self.pool.starmap(durable_work, [(str(root), [])] * self.processes)

    def throughput(self, staging: Path, files: int) -> float:
        """Files per second from the first rename into the inbox to the last archived."""
        names = sorted(path.name for path in staging.iterdir())[:files]
        started = time.perf_counter()
        for name in names:
            (staging / name).rename(self.root / "inbox" / name)
        every = self.processes
        self.pool.starmap(durable_work, [(str(self.root), names[n::every]) for n in range(every)])
        return files / (time.perf_counter() - started)

    def stop(self) -> None:
        self.pool.close()
        self.pool.join()


# Measurements.


def count_files(folder: Path) -> int:
    try:
        return sum(1 for entry in os.scandir(folder) if not entry.name.startswith("."))
    except FileNotFoundError:
        return 0


def throughput(
    root: Path, staging: Path, files: int, hooks: Child | None = None
) -> tuple[float, float | None]:
    """Files per second from the first rename into the inbox to the last archived; with
    `hooks` (a service with on_converted), also the seconds to the last hook run."""
    names = sorted(path.name for path in staging.iterdir())[:files]
    started = time.perf_counter()
    for name in names:
        (staging / name).rename(root / "inbox" / name)
    while count_files(root / "archive") < files:
        time.sleep(0.005)
    rate = files / (time.perf_counter() - started)
    if hooks is None:
        return rate, None
    deadline = time.monotonic() + 600
    while sum('"event_delivered"' in line for line in list(hooks.lines)) < files:
        if time.monotonic() > deadline:
            raise RuntimeError("the hooks did not all run")
        time.sleep(0.005)
    return rate, time.perf_counter() - started


def latency(root: Path, staging: Path, drops: int) -> list[float]:
    """Seconds from rename into the inbox to the output being visible, per isolated drop."""
    seconds = []
    names = sorted(path.name for path in staging.iterdir())[:drops]
    for name in names:
        archived = count_files(root / "archive")
        output = root / "outbox" / name.replace(".npy", ".nii.gz")
        started = time.perf_counter()
        (staging / name).rename(root / "inbox" / name)
        while not output.exists():
            time.sleep(0.0005)
        seconds.append(time.perf_counter() - started)
        while count_files(root / "archive") <= archived:  # let it settle: drops are isolated
            time.sleep(0.001)
        time.sleep(0.05)
    return seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid: int, seconds: float) -> float:
    """The fraction of one core a process used while nothing happened."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


def measure(
    parent: Path, files: int, drops: int, idle: float, rounds: int, *, workers: int | None = None
) -> dict[str, Any]:
    """Throughput: best of `rounds`, the methods taking turns (the machine may be shared).
    Latency and idle CPU: in the first round. `workers`: niftidrop's, if not its default.

    Every run's folders are kept until the end: deleting thousands of files just
    before the next run would slow its file creation down (ext4 without a journal
    skips recently freed inodes one by one), and the run that follows would pay
    for the one before it. Dirty pages are written out before each run.
    """
    source = build_spool(parent / "source", files + drops)
    results: dict[str, Any] = {
        "niftidrop_files_per_second": [],
        "baseline_files_per_second": [],
        "hooked_files_per_second": [],
        "hooked_last_hook_seconds": [],
        "limit_files_per_second": [],
    }
    extra = ("--workers", str(workers)) if workers else ()
    services: dict[str, Callable[[Path], Child]] = {
        "niftidrop": lambda root: start_niftidrop(root, *extra),
        "hooked": lambda root: start_niftidrop(root, *HOOK, *extra),
        "baseline": start_baseline,
    }
    methods = ["niftidrop", "limit", "hooked", "baseline"]
    for turn in range(rounds):
        for method in methods if turn % 2 == 0 else methods[::-1]:
            root, staging = fresh_root(parent, f"{method}-{turn}", source)
            os.sync()
            if method == "limit":
                limit = DurableLimit(root)
                try:
                    results["limit_files_per_second"].append(limit.throughput(staging, files))
                finally:
                    limit.stop()
                continue
            child = services[method](root)
            try:
                hooks = child if method == "hooked" else None
                rate, last_hook = throughput(root, staging, files, hooks)
                results[f"{method}_files_per_second"].append(rate)
                if last_hook is not None:
                    results["hooked_last_hook_seconds"].append(last_hook)
                if turn == 0 and method != "hooked":
                    results[f"{method}_latency"] = latency(root, staging, drops)
                    if method == "niftidrop":
                        results["niftidrop_idle_cpu"] = idle_cpu(child.process.pid, idle)
            finally:
                child.stop()
    return results


def report(results: dict[str, Any], files: int, idle: float) -> list[tuple[str, bool]]:
    ours = max(results["niftidrop_files_per_second"])
    theirs = max(results["baseline_files_per_second"])
    idle_share = results["niftidrop_idle_cpu"]
    our_latency = statistics.median(results["niftidrop_latency"])
    their_latency = statistics.median(results["baseline_latency"])
    print(f"{'':28}{'niftidrop':>12}{'baseline':>12}")
    print(f"{f'throughput, {files} files (files/s)':28}{ours:12.1f}{theirs:12.1f}  (best run)")
    print(f"{'drop latency, median (ms)':28}{our_latency * 1e3:12.1f}{their_latency * 1e3:12.1f}")
    worst = max(results["niftidrop_latency"]) * 1e3
    print(f"{'drop latency, worst (ms)':28}{worst:12.1f}")
    print(f"{f'idle CPU over {idle:g} s (%)':28}{results['niftidrop_idle_cpu'] * 100:12.2f}")
    plain_wall, hooked_wall = files / ours, files / max(results["hooked_files_per_second"])
    last_hook = min(results["hooked_last_hook_seconds"])
    print(f"{'wall time, no hook (s)':28}{plain_wall:12.2f}  (best run)")
    print(
        f"{'wall time, on_converted (s)':28}{hooked_wall:12.2f}  (best run, to the last archived)"
    )
    print(f"{'  to the last hook run (s)':28}{last_hook:12.2f}  (best run)")
    limit = max(results["limit_files_per_second"])
    print(f"{'durable-work limit (files/s)':28}{limit:12.1f}  (best run)")
    return [
        (
            f"throughput {ours / theirs:.1f}x the baseline (bar {THROUGHPUT_BAR:g}x)",
            ours >= THROUGHPUT_BAR * theirs,
        ),
        (
            f"median drop latency {our_latency * 1e3:.1f} ms (bar {LATENCY_BAR * 1e3:g} ms)",
            our_latency < LATENCY_BAR,
        ),
        (
            f"idle CPU {idle_share * 100:.2f}% of a core (bar {IDLE_CPU_BAR * 100:g}%)",
            idle_share < IDLE_CPU_BAR,
        ),
        (
            f"a hook that exits at once adds {(hooked_wall / plain_wall - 1) * 100:+.1f}% "
            f"to the wall time (bar {(HOOK_BAR - 1) * 100:+.0f}%)",
            hooked_wall <= HOOK_BAR * plain_wall,
        ),
        (
            f"throughput {ours / limit:.2f} of the durable-work limit (bar {LIMIT_BAR:g})",
            ours >= LIMIT_BAR * limit,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Build the spool, measure both services, print the table and the bars."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_service")
    parser.add_argument("--files", type=int, default=1000, help="inputs dropped at once")
    parser.add_argument("--drops", type=int, default=30, help="isolated drops for latency")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU sampling")
    parser.add_argument("--rounds", type=int, default=2, help="throughput runs per method")
    parser.add_argument("--workers", type=int, help="niftidrop's workers (default: its own)")
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    parser.add_argument("--baseline", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline:
        baseline(args.baseline)
        return 0
    workers = f", niftidrop with {args.workers} workers" if args.workers else ""
    print(f"service benchmark: {os.cpu_count()} CPUs, {args.files} 64³ uint8 label maps{workers}")
    with tempfile.TemporaryDirectory(prefix="niftidrop-bench-") as temp:
        results = measure(
            Path(temp), args.files, args.drops, args.idle, args.rounds, workers=args.workers
        )
    bars = report(results, args.files, args.idle)
    if args.json:
        print(json.dumps(results))
    for text, passed in bars:
        print(f"{'PASS' if passed else 'FAIL'}  {text}")
    return 0 if all(passed for _, passed in bars) else 1


if __name__ == "__main__":
    sys.exit(main())
