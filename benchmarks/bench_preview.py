"""Preview cost: a 512x512x300 uint8 label map converted with and without `preview`.

The README's bar: the preview adds at most 10 % to that input's conversion time.
The reference is a CT-like int16 phantom, once as `.nii` (its three slices are read
through a memory map) and once as `.nii.gz` (read in one streamed pass). Runs
alternate with and without the preview, in this process, with the input and the
reference warm in the page cache; medians are shown.

    python -m benchmarks preview            # or: python -m benchmarks.bench_preview
    python -m benchmarks.bench_preview --repeat 7 --size 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel
import numpy as np

from niftidrop.api import convert_file
from niftidrop.settings import Settings

nib: Any = nibabel  # nibabel's functions carry no annotations

RATIO_BAR = 0.10  # the preview's time as a fraction of the conversion's


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


def measure(source: Path, reference: Path, out: Path, repeat: int) -> tuple[float, float]:
    """Median seconds of `convert_file` without and with the preview."""
    timings: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeat):
        for preview in (False, True):
            settings = Settings.from_values(fsync=False, preview=preview)
            started = time.perf_counter()
            result = convert_file(source, out, settings=settings, reference=reference)
            timings[preview].append(time.perf_counter() - started)
            if preview and result.preview_error:
                raise RuntimeError(result.preview_error)
    return statistics.median(timings[False]), statistics.median(timings[True])


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
        for name in ("ct.nii", "ct.nii.gz"):
            nib.save(image, root / name)
        del scan, labels, image
        print(f"uint8 label map {shape}, reference int16; medians of {args.repeat} runs\n")
        print("| reference | conversion | with preview | preview | ratio |")
        print("|---|---|---|---|---|")
        for name in ("ct.nii", "ct.nii.gz"):
            plain, previewed = measure(root / "case.npy", root / name, root / "out", args.repeat)
            cost = previewed - plain
            ratio = cost / plain
            print(
                f"| `{name}` | {plain * 1000:.0f} ms | {previewed * 1000:.0f} ms "
                f"| {cost * 1000:.0f} ms | {ratio:.0%} |"
            )
            if name == "ct.nii" and ratio > RATIO_BAR:
                status = 1
        print(f"\nbar: the preview at most {RATIO_BAR:.0%} of the conversion (`.nii` reference)")
    return status


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
