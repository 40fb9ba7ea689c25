"""Reference library at scale: index build time, lookup time per rule, index memory.

Builds a library of empty `*.nii.gz` files (the index reads names only) in a few
hundred folders, then compares `ReferenceLibrary.match` with what users write by
hand: a recursive `glob(key + "*")` over the library for every input.

    python -m benchmarks.bench_library [--files 100000] [--folders 400]
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

from niftidrop.library import ReferenceLibrary

BUILD_BAR_S = 1.0
LOOKUP_BAR_US = 20.0
MEMORY_BAR_MB = 64.0


def make_library(root: Path, files: int, folders: int) -> None:
    """`files` empty references spread over `folders` folders, two levels deep.

    Per four cases: two plain scans (`case000000.nii.gz`), and one nnU-Net case
    with two channels (`case000002_0000.nii.gz`, `case000002_0001.nii.gz`).
    """
    sites = max(1, int(folders**0.5))
    for number in range(files):
        folder = root / f"site{number % sites:02d}" / f"batch{number % folders:03d}"
        if number < folders:
            folder.mkdir(parents=True, exist_ok=True)
        if number % 4 in (0, 1):
            name = f"case{number:06d}.nii.gz"
        else:
            channel = number % 4 - 2
            name = f"case{number - channel:06d}_{channel:04d}.nii.gz"
        os.close(os.open(folder / name, os.O_CREAT | os.O_WRONLY, 0o644))
    # A library at rest: nothing changed in the last hour (rescans trust old mtimes).
    past = time.time_ns() - 3600 * 10**9
    for folder in [root, *root.rglob("*")]:
        if folder.is_dir():
            os.utime(folder, ns=(past, past))


def sample_inputs(files: int, count: int, seed: int = 0) -> dict[str, list[str]]:
    """Input names that resolve by each rule, drawn at random from the library."""
    chooser = random.Random(seed)
    plain = [*range(0, files, 4), *range(1, files, 4)]
    channels = list(range(2, files, 4))
    return {
        "exact": [f"case{n:06d}.npz" for n in chooser.choices(plain, k=count)],
        "reference_prefix": [
            f"case{n:06d}_pred_fold0.npz" for n in chooser.choices(plain, k=count)
        ],
        "input_prefix": [f"case{n:06d}.npz" for n in chooser.choices(channels, k=count)],
    }


def median_seconds(action: Callable[[str], object], names: Sequence[str]) -> float:
    """The median time of `action(name)` over `names`, timed one call at a time."""
    timings = []
    for name in names:
        start = time.perf_counter()
        action(name)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def hand_written_lookup(root: Path) -> Callable[[str], object]:
    """The baseline: a recursive glob for the input's key, as users write it by hand."""

    def look_up(name: str) -> list[Path]:
        key = name.rsplit(".", 1)[0]
        return sorted(root.glob(f"**/{glob.escape(key)}*"))

    return look_up


def measure(root: Path, files: int, lookups: int, baseline_lookups: int) -> list[list[str]]:
    """Every measurement, as table rows."""
    library = ReferenceLibrary([root])
    builds = []
    for _ in range(3):
        start = time.perf_counter()
        library.build()
        builds.append(time.perf_counter() - start)
    assert len(library) == files, f"indexed {len(library)} of {files} references"

    rescans = []
    for _ in range(3):
        start = time.perf_counter()
        library.rescan()
        rescans.append(time.perf_counter() - start)

    library = ReferenceLibrary([root])
    tracemalloc.start()
    library.build()
    index_bytes, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    build_s = statistics.median(builds)
    rows = [
        ["index build (median of 3)", f"{build_s:.3f} s", f"≤ {BUILD_BAR_S:g} s", "", ""],
        [
            "rescan of the unchanged library (median of 3)",
            f"{statistics.median(rescans) * 1e3:.1f} ms",
            "",
            "",
            "",
        ],
        [
            "index memory (peak while building)",
            f"{index_bytes / 2**20:.1f} MB ({peak_bytes / 2**20:.1f} MB)",
            f"< {MEMORY_BAR_MB:g} MB",
            "",
            "",
        ],
    ]
    baseline = hand_written_lookup(root)
    for rule, names in sample_inputs(files, lookups).items():
        for name in names[:10]:
            assert library.match(name).rule == rule, name
        ours = median_seconds(library.match, names)
        theirs = median_seconds(baseline, names[:baseline_lookups])
        rows.append(
            [
                f"lookup, rule {rule} (median)",
                f"{ours * 1e6:.1f} µs",
                f"< {LOOKUP_BAR_US:g} µs",
                f"{theirs * 1e3:.0f} ms",
                f"{theirs / ours:,.0f} x",
            ]
        )
    return rows


def print_table(rows: list[list[str]]) -> None:
    header = ["measure", "niftidrop", "bar", "recursive glob", "speed-up"]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, ["-" * width for width in widths], *rows]:
        print(
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            + " |"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_library", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="references in the library")
    parser.add_argument("--folders", type=int, default=400, help="folders they are spread over")
    parser.add_argument("--lookups", type=int, default=10_000, help="timed lookups per rule")
    parser.add_argument(
        "--baseline-lookups", type=int, default=10, help="timed recursive globs per rule"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="niftidrop-bench-library-") as temporary:
        root = Path(temporary)
        start = time.perf_counter()
        make_library(root, args.files, args.folders)
        print(
            f"Reference library: {args.files:,} references in {args.folders} folders "
            f"(created in {time.perf_counter() - start:.1f} s)\n"
        )
        print_table(measure(root, args.files, args.lookups, args.baseline_lookups))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
