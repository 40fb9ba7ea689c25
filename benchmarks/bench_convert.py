"""Conversion speed, memory and output size: niftidrop against nib.save and nidataset.

Every measurement runs in a fresh child process, so its peak memory is its own:
the child resets its high-water mark (VmHWM) just before converting and reports
the peak minus the resident size at that moment ("above idle"). Inputs are built
once in a temporary folder and are warm in the page cache for every method. The
methods of a case take turns, round after round (the order reversed every other
round), so a busy machine slows them alike; each keeps its fastest round.

"compress-only" is the floor of a conversion: the output file's exact bytes
(header and values as niftidrop writes them, made in memory before the clock
starts) compressed alone with the same compressor, level and threads, written
the same way (a temporary name, the file fsynced, renamed over the previous
run's file, the folder fsynced). Its file must be byte for byte niftidrop's.

Streamed `.npz` members and lean argmax have cases of their own: a 256³ float32
`.npz`, and 4x256³ float16 softmax maps (a channels-first `.npz`, and a (C, Z, Y, X)
`.npy` read with `axis_order = "zyx"`) arg-maxed, against the time of compressing the
`.npz`'s `keep` output alone (its compress-only run). A CT-sized 512x512x300 uint8
label map (whatever `--size` says) shows the transposing copy on a large input.

    python -m benchmarks convert            # or: python -m benchmarks.bench_convert
    python -m benchmarks.bench_convert --runs 5 --size 256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel
import numpy as np

# nibabel's functions carry no annotations.
nib: Any = nibabel

SPEEDUP_BAR = 5.0  # at least this many times faster than nib.save
MEMORY_BAR = 0.5  # peak memory above idle, as a fraction of the array's size
COMPRESS_BAR = 1.3  # conversion time at most this many times the compress-only time
LEVELS = range(4)  # the compression levels ISA-L offers (`compression_level`)
ARGMAX_TIME_BAR = 1.5  # argmax at most this many times the keep output's compress-only time
SOFTMAX_CHANNELS = 4
SMALL_ARRAY = 8 * 2**20  # below this, memory ÷ array size is not shown
CT_SHAPE = (512, 512, 300)  # a CT's label map, as nnU-Net writes it for a 3-D scan
LABEL_FILES = 40  # 64³ label maps converted per child, for a per-file time


# Inputs.


def smooth_probabilities(size: int, channels: int = 0) -> np.ndarray:
    """A smooth float32 probability map (a blurred sphere), or `channels` softmax maps."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    x, y, z = axis[:, None, None], axis[None, :, None], axis[None, None, :]
    radius = np.sqrt(x * x + 0.8 * y * y + 1.2 * z * z)
    wobble = np.float32(0.05) * np.sin(np.float32(5.0) * x) * np.cos(np.float32(3.0) * y)
    sphere: np.ndarray = (1.0 / (1.0 + np.exp((radius + wobble - 0.55) / 0.04))).astype(np.float32)
    if not channels:
        return sphere
    shells = [np.exp(-(((radius - 0.3 * c) / 0.15) ** 2)) for c in range(channels)]
    scores = np.stack(shells).astype(np.float32) + np.float32(1e-3)
    softmax: np.ndarray = (scores / scores.sum(axis=0)).astype(np.float32)
    return softmax


def ct_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """A CT-sized label map in C order: nested ellipsoids labelled 0-4."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    radius = np.sqrt(x * x + 1.3 * y * y + 0.7 * z * z)
    labels: np.ndarray = np.clip(5.0 - radius * 6.0, 0, 4).astype(np.uint8)
    return labels


def reference_image(path: Path, shape: tuple[int, ...], spacing: float) -> None:
    """An int16 scan with a scale factor (values beyond int16), oblique, like a CT."""
    affine = np.diag([spacing, spacing, 1.5 * spacing, 1.0])
    affine[:3, 3] = [-100.0, -120.0, 40.0]
    values = smooth_probabilities(shape[0]) * 90_000.0 - 1000.0
    image = nib.Nifti1Image(values.astype(np.float32), affine)
    image.set_data_dtype(np.int16)  # nibabel stores int16 with scl_slope / scl_inter
    image.header.set_qform(affine, code=1)
    nib.save(image, path)


def build_inputs(folder: Path, size: int) -> None:
    """Every input of every case, in `folder`."""
    probabilities = smooth_probabilities(size)
    np.save(folder / "prob_c.npy", probabilities)
    np.save(folder / "prob_f.npy", np.asfortranarray(probabilities))
    reference_image(folder / "scan.nii.gz", (size,) * 3, 0.8)
    labels = (smooth_probabilities(64) * 4.99).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    np.save(folder / "labels_large.npy", (probabilities * 4.99).astype(np.uint8))
    reference_image(folder / "small.nii.gz", (64,) * 3, 1.0)
    np.save(folder / "labels_ct.npy", ct_labels(CT_SHAPE))
    ct_affine = np.diag([0.7, 0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros(CT_SHAPE, np.int16), ct_affine), folder / "ct.nii.gz")
    channel_size = size * 5 // 8
    np.save(folder / "softmax.npy", smooth_probabilities(channel_size, channels=4))
    reference_image(folder / "mid.nii.gz", (channel_size,) * 3, 1.0)
    build_npz_inputs(folder, size, probabilities)


def build_npz_inputs(folder: Path, size: int, probabilities: np.ndarray) -> None:
    """The inputs of `npz_cases`: a deflated .npz, and float16 softmax maps."""
    np.savez_compressed(folder / "prob.npz", probabilities=probabilities)
    softmax = smooth_probabilities(size, channels=SOFTMAX_CHANNELS).astype(np.float16)
    np.savez_compressed(folder / "softmax16.npz", probabilities=softmax)
    # (C, Z, Y, X): what SimpleITK-based pipelines hand over, read with axis_order "zyx".
    np.save(folder / "softmax16_zyx.npy", np.ascontiguousarray(softmax.transpose(0, 3, 2, 1)))


# The methods (run in the child). Each is made for its input before the clock starts.

Convert = Callable[[Path, Path, Path], Path]


def niftidrop_method(**options: Any) -> Convert:
    from niftidrop.api import convert_file
    from niftidrop.settings import Settings

    settings = Settings.model_validate(options)

    def convert(source: Path, reference: Path, out: Path) -> Path:
        return convert_file(source, out, settings=settings, reference=reference).outputs[0]

    return convert


def compress_only_method(source: Path, reference: Path, **options: Any) -> Convert:
    """The output's bytes, made now; the method compresses and writes only them."""
    from niftidrop import __version__
    from niftidrop.arrays import open_input
    from niftidrop.conversion import encode_volume, plan_conversion
    from niftidrop.reference import read_reference
    from niftidrop.settings import Settings
    from niftidrop.writer import write_file

    settings = Settings.model_validate(options)
    array = open_input(source, npz_key=None, max_input_bytes=settings.max_input_bytes)
    plan = plan_conversion(array, read_reference(reference), version=__version__)
    (volume,) = plan.volumes
    content = b"".join(bytes(chunk) for chunk in encode_volume(volume, array))
    del array

    def compress(source: Path, reference: Path, out: Path) -> Path:
        # As convert_file writes: fsync the file, rename, fsync the folder once.
        return write_file(
            out / (source.name.removesuffix(source.suffix) + ".nii.gz"),
            [memoryview(content)],
            compress=True,
            level=settings.compression_level,
            threads=settings.threads,
            fsync=settings.fsync,
            size=len(content),
        )

    return compress


def nib_save(source: Path, reference: Path, out: Path) -> Path:
    """What users write by hand: load, wrap with the reference's affine, save."""
    data = load_array(source)
    if data.ndim == 4:  # channels first -> last, as NIfTI wants them
        data = np.moveaxis(data, 0, -1)
    target = out / (source.name.removesuffix(source.suffix) + ".nii.gz")
    nib.save(nib.Nifti1Image(data, nib.load(reference).affine), target)
    return target


def load_array(source: Path) -> np.ndarray:
    """A .npy memory-mapped, or a .npz's first member in memory."""
    if source.suffix == ".npz":
        with np.load(source) as archive:
            member: np.ndarray = archive[archive.files[0]]
            return member
    mapped: np.ndarray = np.load(source, mmap_mode="r")
    return mapped


def nidataset_method() -> Convert:
    # Imported here, before the clock starts: nidataset's imports are not its speed.
    from nidataset.transforms import numpy_to_nifti

    def convert(source: Path, reference: Path, out: Path) -> Path:
        return Path(numpy_to_nifti(str(source), str(out), reference_nifti=str(reference)))

    return convert


def _at_level(level: int) -> Callable[[Path, Path], Convert]:
    return lambda source, reference: niftidrop_method(compression_level=level)


# Method name -> a function of (input, reference) that makes the method.
METHODS: dict[str, Callable[[Path, Path], Convert]] = {
    "niftidrop": lambda source, reference: niftidrop_method(),
    "compress-only": compress_only_method,
    "niftidrop argmax": lambda source, reference: niftidrop_method(channels="argmax"),
    "niftidrop argmax, zyx": lambda source, reference: niftidrop_method(
        channels="argmax", axis_order="zyx"
    ),
    "niftidrop, fsync off": lambda source, reference: niftidrop_method(fsync=False),
    "nib.save": lambda source, reference: nib_save,
    "nidataset": lambda source, reference: nidataset_method(),
    **{f"niftidrop, level {level}": _at_level(level) for level in LEVELS},
}


def _status_kib(field: str) -> int | None:
    try:
        with Path("/proc/self/status").open() as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child(method: str, source: Path, reference: Path, out: Path, repeat: int) -> dict[str, Any]:
    """Convert `source` `repeat` times in this process; time, peak memory, max error."""
    convert = METHODS[method](source, reference)
    out.mkdir(parents=True, exist_ok=True)
    has_reset = _reset_peak()
    idle = _status_kib("VmRSS") or 0
    started = time.perf_counter()
    for _ in range(repeat):
        written = convert(source, reference, out)
    seconds = (time.perf_counter() - started) / repeat
    peak = _status_kib("VmHWM") if has_reset else None
    if peak is None:  # no /proc: the whole child's peak, an upper bound
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    array = load_array(source)
    image = nib.load(written)
    stored = np.asanyarray(image.dataobj)  # with any scale factor applied
    expected = (
        np.moveaxis(array, 0, -1) if array.ndim == 4 and stored.shape != array.shape else array
    )
    if "zyx" in method:
        expected = expected.transpose(2, 1, 0, *range(3, expected.ndim))
    if "argmax" in method:
        expected = np.argmax(expected, axis=-1)
    error = float(np.max(np.abs(stored.astype(np.float64) - expected)))
    return {
        "seconds": seconds,
        "peak_above_idle": (peak - idle) * 1024,
        "array_bytes": int(array.nbytes),
        "dtype_out": str(image.get_data_dtype()),  # on disk
        "max_abs_error": error,
        "output_bytes": written.stat().st_size,
        "sha256": hashlib.sha256(written.read_bytes()).hexdigest(),
    }


# The parent.


def run_child(method: str, source: Path, reference: Path, out: Path, repeat: int) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_convert",
        "--child",
        method,
        str(source),
        str(reference),
        str(out),
        str(repeat),
    ]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"{method} on {source.name} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def side_by_side(
    runs: int, methods: Sequence[str], *, source: Path, reference: Path, out: Path, repeat: int
) -> dict[str, dict[str, Any]]:
    """Every method of one case, `runs` rounds of fresh children taking turns.

    Each method keeps its fastest round (as timeit does: slower rounds only add other
    processes' noise) and the worst memory seen.
    """
    results: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    for number in range(runs):
        for method in methods if number % 2 == 0 else list(reversed(methods)):
            results[method].append(run_child(method, source, reference, out / method, repeat))
    summaries = {}
    for method, rounds in results.items():
        summary = dict(rounds[0])
        summary["seconds"] = min(r["seconds"] for r in rounds)
        summary["peak_above_idle"] = max(r["peak_above_idle"] for r in rounds)
        summaries[method] = summary
    return summaries


# Case title ({n}: the probability map's edge, {m}: the softmax's), input, reference,
# conversions per child, methods.
CASES = [
    (
        "{n}³ float32 .npy, C order",
        "prob_c.npy",
        "scan.nii.gz",
        1,
        ["niftidrop", "compress-only", "nib.save", "nidataset"],
    ),
    (
        "{n}³ float32 .npy, Fortran order",
        "prob_f.npy",
        "scan.nii.gz",
        1,
        ["niftidrop", "compress-only", "nib.save", "nidataset"],
    ),
    (
        "{n}³ uint8 label map",
        "labels_large.npy",
        "scan.nii.gz",
        3,
        ["niftidrop", "compress-only", "nib.save"]
        + [f"niftidrop, level {level}" for level in LEVELS if level != 1],
    ),
    (
        "512x512x300 uint8 label map (CT), C order",
        "labels_ct.npy",
        "ct.nii.gz",
        1,
        ["niftidrop", "compress-only", "nib.save"],
    ),
    (
        "64³ uint8 label map (per file)",
        "labels.npy",
        "small.nii.gz",
        LABEL_FILES,
        ["niftidrop", "niftidrop, fsync off", "nib.save", "nidataset"],
    ),
    (
        "4x{m}³ float32 softmax, channels first",
        "softmax.npy",
        "mid.nii.gz",
        1,
        ["niftidrop", "niftidrop argmax", "nib.save"],
    ),
    (
        "{n}³ float32 .npz (deflated), C order",
        "prob.npz",
        "scan.nii.gz",
        1,
        ["niftidrop", "nib.save"],
    ),
    (
        "4x{n}³ float16 softmax .npz, channels first",
        "softmax16.npz",
        "scan.nii.gz",
        1,
        ["niftidrop argmax", "compress-only"],
    ),
    (
        "4x{n}³ float16 softmax .npy (C, Z, Y, X), zyx",
        "softmax16_zyx.npy",
        "scan.nii.gz",
        1,
        ["niftidrop argmax, zyx"],
    ),
]
# The arg-maxed softmax cases: their bars are against the .npz's keep compress-only.
ARGMAX_CASES = ("softmax16.npz", "softmax16_zyx.npy")
# The cases whose output size and level sweep are shown (niftidrop's default level is 1).
SIZE_CASES = ("prob_c.npy", "labels_large.npy")
SWEEP_CASE = "labels_large.npy"


Rows = list[list[str]]


def measure(
    folder: Path, runs: int, size: int
) -> tuple[Rows, Rows, Rows, list[tuple[str, bool | None]]]:
    """Every case: the table's rows, the size and level rows, and the bars with verdicts."""
    rows: list[list[str]] = []
    sizes: list[list[str]] = []
    sweep: list[list[str]] = []
    bars: list[tuple[str, bool | None]] = []  # None: a figure without a bar
    keep_floor: dict[str, Any] = {}  # the softmax .npz's keep output, compress-only
    for template, name, reference, repeat, methods in CASES:
        title = template.format(n=size, m=size * 5 // 8)
        results = side_by_side(
            runs,
            methods,
            source=folder / name,
            reference=folder / reference,
            out=folder / "out",
            repeat=repeat,
        )
        baseline = results["nib.save"]["seconds"] if "nib.save" in results else None
        for method, result in results.items():
            if not method.startswith("niftidrop, level"):
                rows.append(_row(title, method, result, baseline))
        if name in ARGMAX_CASES:
            keep_floor = results.get("compress-only", keep_floor)
            (method,) = (each for each in methods if "argmax" in each)
            bars.extend(_argmax_bars(title, results[method], keep_floor))
            continue
        ours = results["niftidrop"]
        if name == "prob.npz":
            share = ours["peak_above_idle"] / ours["array_bytes"]
            bars.append(
                (
                    f"{title}: peak above idle {share:.2f}x the array (bar {MEMORY_BAR:g}x)",
                    share <= MEMORY_BAR,
                )
            )
        if "compress-only" in results:
            # The bar is the probability map's; for the label map it is a figure.
            bar = name.startswith("prob_")
            bars.extend(_compress_only_bars(title, ours, results["compress-only"], bar=bar))
        if name == "prob_c.npy":
            speedup = baseline / ours["seconds"]
            bars.append(
                (
                    f"{speedup:.1f}x faster than nib.save (bar {SPEEDUP_BAR:g}x)",
                    speedup >= SPEEDUP_BAR,
                )
            )
            theirs = results["nidataset"]["seconds"]
            bars.append(
                (
                    f"faster than nidataset ({ours['seconds']:.2f} s vs {theirs:.2f} s)",
                    ours["seconds"] < theirs,
                )
            )
        if name in ("prob_c.npy", "prob_f.npy"):
            share = ours["peak_above_idle"] / ours["array_bytes"]
            bars.append(
                (
                    f"{title}: peak above idle {share:.2f}x the array (bar {MEMORY_BAR:g}x)",
                    share <= MEMORY_BAR,
                )
            )
        if name in SIZE_CASES:
            sizes.append(_size_row(title, ours, results["nib.save"]))
        if name == SWEEP_CASE:
            sweep.extend(_sweep_rows(results))
    return rows, sizes, sweep, bars


def _compress_only_bars(
    title: str, ours: dict[str, Any], floor: dict[str, Any], *, bar: bool
) -> list[tuple[str, bool | None]]:
    """Conversion ÷ compress-only (against the bar, or as a figure), and the same bytes
    in both files."""
    ratio = ours["seconds"] / floor["seconds"]
    return [
        (
            f"{title}: conversion {ratio:.2f}x compress-only ({ours['seconds']:.3f} s vs "
            f"{floor['seconds']:.3f} s" + (f"; bar {COMPRESS_BAR:g}x)" if bar else ")"),
            ratio <= COMPRESS_BAR if bar else None,
        ),
        (
            f"{title}: compress-only wrote the conversion's bytes",
            ours["sha256"] == floor["sha256"],
        ),
    ]


def _argmax_bars(
    title: str, ours: dict[str, Any], floor: dict[str, Any]
) -> list[tuple[str, bool | None]]:
    """Memory and time of an arg-maxed softmax map against their bars."""
    share = ours["peak_above_idle"] / ours["array_bytes"]
    ratio = ours["seconds"] / floor["seconds"]
    return [
        (
            f"{title} argmax: peak above idle {share:.2f}x the array (bar {MEMORY_BAR:g}x)",
            share <= MEMORY_BAR,
        ),
        (
            f"{title} argmax: {ratio:.2f}x the keep output's compress-only time "
            f"({ours['seconds']:.3f} s vs {floor['seconds']:.3f} s; bar {ARGMAX_TIME_BAR:g}x)",
            ratio <= ARGMAX_TIME_BAR,
        ),
    ]


def _size_row(title: str, ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    mine, baseline = ours["output_bytes"], theirs["output_bytes"]
    return [title, _size(mine), _size(baseline), f"{mine / baseline:.2f}x"]


def _sweep_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per level (1 is the "niftidrop" run) and nib.save's, for the label map."""
    by_level = {
        level: results["niftidrop" if level == 1 else f"niftidrop, level {level}"]
        for level in LEVELS
    }
    default = by_level[1]
    rows = [
        [
            f"niftidrop, `compression_level = {level}`" + (" (default)" if level == 1 else ""),
            _time(result["seconds"]),
            f"{result['seconds'] / default['seconds']:.2f}x",
            _size(result["output_bytes"]),
            f"{result['output_bytes'] / default['output_bytes']:.2f}x",
        ]
        for level, result in by_level.items()
    ]
    theirs = results["nib.save"]
    rows.append(
        [
            "nib.save (zlib, its default level 1)",
            _time(theirs["seconds"]),
            f"{theirs['seconds'] / default['seconds']:.2f}x",
            _size(theirs["output_bytes"]),
            f"{theirs['output_bytes'] / default['output_bytes']:.2f}x",
        ]
    )
    return rows


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 0.1 else f"{seconds:.2f} s"


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def _row(title: str, method: str, result: dict[str, Any], baseline: float | None) -> list[str]:
    seconds = result["seconds"]
    share = result["peak_above_idle"] / result["array_bytes"]
    return [
        title,
        method,
        _time(seconds),
        f"{baseline / seconds:.1f}x" if baseline else "n/a",
        f"{result['peak_above_idle'] / 2**20:.0f} MiB",
        # For small arrays the fixed overhead (threads, buffers) dominates the ratio.
        f"{share:.2f}x" if result["array_bytes"] >= SMALL_ARRAY else "n/a",
        result["dtype_out"],
        f"{result['max_abs_error']:.3g}",
        _size(result["output_bytes"]),
    ]


HEADER = [
    "case",
    "method",
    "time",
    "vs nib.save",
    "peak above idle",
    "÷ array",
    "stored as",
    "max abs error",
    "output",
]
SIZE_HEADER = ["case", "niftidrop (level 1)", "nib.save (zlib level 1)", "÷ nib.save"]
SWEEP_HEADER = ["{n}³ uint8 label map", "time", "÷ level 1", "output", "÷ level 1"]


def print_table(rows: list[list[str]], header: list[str] = HEADER) -> None:
    """A Markdown table, ready for the README."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the inputs, measure every case, print the table and the bars."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_convert")
    parser.add_argument("--runs", type=int, default=3, help="fresh children per measurement")
    parser.add_argument("--size", type=int, default=256, help="edge of the probability map")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, source, reference, out, repeat = args.child
        result = child(method, Path(source), Path(reference), Path(out), int(repeat))
        print(json.dumps(result))
        return 0
    load = os.getloadavg()[0]
    print(
        f"conversion benchmark: {os.cpu_count()} CPUs, load average {load:.1f}, "
        f"best of {args.runs} alternating rounds each"
    )
    with tempfile.TemporaryDirectory(prefix="niftidrop-bench-") as temp:
        folder = Path(temp)
        build_inputs(folder, args.size)
        rows, sizes, sweep, bars = measure(folder, args.runs, args.size)
    print_table(rows)
    print("\nOutput size against nib.save's default level:\n")
    print_table(sizes, SIZE_HEADER)
    print("\nCompression levels, label map:\n")
    print_table(sweep, [SWEEP_HEADER[0].format(n=args.size), *SWEEP_HEADER[1:]])
    print()
    for text, passed in bars:
        print(f"{'    ' if passed is None else 'PASS' if passed else 'FAIL'}  {text}")
    return 0 if all(passed is not False for _, passed in bars) else 1


if __name__ == "__main__":
    sys.exit(main())
