"""Preview cost: a 512x512x300 uint8 label map converted with and without `preview`.

The README's bar: the preview adds at most 10 % to that input's conversion time,
with an uncompressed reference. The reference is a CT-like int16 phantom, once as
`.nii` (its three slices are read through a memory map) and once as `.nii.gz`
(read in one streamed pass: shown, with its verdict, but the exit status is the
`.nii` one's). Runs alternate with and without the preview, in this process, with
the input and the reference warm in the page cache; medians of wall and CPU time
are shown; the verdict is on wall time, as the bar is.

It also times, alone, the two passes no correct preview of the `.nii` case can
skip (the floor): the centre pass over the output's voxels as the conversion
hands them to the writer (every voxel must be seen to find the non-zero ones), and
reading the reference's three slices through the centre (the sagittal one has a
voxel in every page of the scan); fastest of the runs.

    python -m benchmarks preview            # or: python -m benchmarks.bench_preview
    python -m benchmarks.bench_preview --repeat 7 --size 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel
import numpy as np

from niftidrop.api import convert_file
from niftidrop.preview_slices import BLOCK_BYTES, OutputWatch, reference_slices
from niftidrop.settings import Settings

nib: Any = nibabel  # nibabel's functions carry no annotations

RATIO_BAR = 0.10  # the preview's time as a fraction of the conversion's
REFERENCES = ("ct.nii", "ct.nii.gz")
# Why the compressed case is shown but does not decide the exit status.
NOT_THREE_SLICES = (
    " (not the bar's case: a gzip stream cannot seek, so the three slices"
    " cost decompressing the whole scan; see the README, Performance)"
)


def phantom(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 scan (a body, two organs, noise) and its uint8 label map."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    x, y, z = ((g - n / 2) / (n / 2) for g, n in zip(grids, shape, strict=True))
    body = x * x / 0.8 + y * y / 0.6 <= 1.0
    liver = (x - 0.3) ** 2 / 0.05 + y * y / 0.04 + (z - 0.1) ** 2 / 0.1 <= 1.0
    kidney = (x + 0.35) ** 2 / 0.01 + (y + 0.2) ** 2 / 0.01 + z * z / 0.05 <= 1.0
    labels = np.zeros(shape, dtype=np.uint8)
    labels[np.broadcast_to(liver, shape)] = 1
    labels[np.broadcast_to(kidney, shape)] = 2
    rng = np.random.default_rng(0)
    scan = np.where(np.broadcast_to(body, shape), 40, -1000).astype(np.int16)
    scan += (labels * 30).astype(np.int16)
    scan += rng.normal(0.0, 15.0, shape).astype(np.int16)
    return scan, labels


@dataclass(frozen=True)
class Timing:
    """Medians of one reference's runs, in seconds: wall-clock and this process's CPU."""

    plain_wall: float
    plain_cpu: float
    preview_wall: float
    preview_cpu: float

    def share(self, cpu: bool) -> float:
        """The preview's cost as a fraction of the conversion's (wall or CPU time)."""
        if cpu:
            return (self.preview_cpu - self.plain_cpu) / self.plain_cpu
        return (self.preview_wall - self.plain_wall) / self.plain_wall


def measure(source: Path, reference: Path, out: Path, repeat: int) -> Timing:
    """Medians of `convert_file` without and with the preview, runs alternating.

    CPU time (`time.process_time`, every thread of this process) is shown beside
    wall time: on a shared machine it is the steadier of the two, though the
    conversion's compression threads make its share of the CPU the smaller one.
    """
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeat):
        for preview in (False, True):
            settings = Settings.from_values(fsync=False, preview=preview)
            started, started_cpu = time.perf_counter(), time.process_time()
            result = convert_file(source, out, settings=settings, reference=reference)
            wall[preview].append(time.perf_counter() - started)
            cpu[preview].append(time.process_time() - started_cpu)
            if preview and result.preview_error:
                raise RuntimeError(result.preview_error)
    median = statistics.median
    return Timing(median(wall[False]), median(cpu[False]), median(wall[True]), median(cpu[True]))


def floor(source: Path, reference: Path, repeat: int) -> tuple[float, float]:
    """The fastest of `repeat` runs of the centre pass and of reading the reference's
    three slices, each alone, in seconds."""
    labels = np.load(source)
    shape = (labels.shape[0], labels.shape[1], labels.shape[2])
    voxels = labels.reshape(-1, order="F")  # in the output file's order
    step = BLOCK_BYTES // voxels.itemsize
    chunks = [memoryview(voxels[start : start + step]) for start in range(0, voxels.size, step)]

    def centre() -> tuple[int, int, int] | None:
        watch = OutputWatch(shape, voxels.dtype)
        for _ in watch.watch([b"", *chunks]):  # a header, then the voxels
            pass
        return watch.centre()

    at = centre()
    assert at is not None
    centring, reading = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        centre()
        centring.append(time.perf_counter() - started)
        started = time.perf_counter()
        reference_slices(reference, at)
        reading.append(time.perf_counter() - started)
    return min(centring), min(reading)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="x and y (z: 300/512 of it)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    shape = (args.size, args.size, max(1, args.size * 300 // 512))
    status = 0
    with tempfile.TemporaryDirectory(prefix="niftidrop-bench-preview-") as folder:
        root = Path(folder)
        scan, labels = phantom(shape)
        np.save(root / "case.npy", labels)
        image = nib.Nifti1Image(scan, np.diag([0.8, 0.8, 1.5, 1.0]))
        for name in REFERENCES:
            nib.save(image, root / name)
        del scan, labels, image
        print(f"uint8 label map {shape}, reference int16; medians of {args.repeat} runs\n")
        print("| reference | conversion | with preview | preview | share (wall) | share (CPU) |")
        print("|---|---|---|---|---|---|")
        timings = {}
        for name in REFERENCES:
            timing = measure(root / "case.npy", root / name, root / "out", args.repeat)
            timings[name] = timing
            print(
                f"| `{name}` | {timing.plain_wall * 1000:.0f} ms "
                f"| {timing.preview_wall * 1000:.0f} ms "
                f"| {(timing.preview_wall - timing.plain_wall) * 1000:.0f} ms "
                f"| {timing.share(cpu=False):.0%} | {timing.share(cpu=True):.0%} |"
            )
        centring, reading = floor(root / "case.npy", root / "ct.nii", args.repeat)
        plain = timings["ct.nii"].plain_wall
        print(
            f"\nfloor, `ct.nii`: the centre pass {centring * 1000:.1f} ms + the reference's"
            f" slices {reading * 1000:.1f} ms = {(centring + reading) / plain:.0%} of the"
            " conversion, before any drawing (fastest runs)"
        )
        print()
        for name, timing in timings.items():
            passed = timing.share(cpu=False) <= RATIO_BAR
            print(
                f"{'PASS' if passed else 'FAIL'}  the preview at most {RATIO_BAR:.0%} of the "
                f"conversion, `{name}` reference: {timing.share(cpu=False):.0%} of its time"
                f" ({timing.share(cpu=True):.0%} of its CPU time)"
                f"{'' if name.endswith('.nii') else NOT_THREE_SLICES}"
            )
            if name.endswith(".nii") and not passed:
                status = 1
    return status


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
