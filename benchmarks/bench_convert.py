"""Conversion speed and memory: niftidrop against nib.save and nidataset.

Every measurement runs in a fresh child process, so its peak memory is its own:
the child resets its high-water mark (VmHWM) just before converting and reports
the peak minus the resident size at that moment ("above idle"). Inputs are built
once in a temporary folder and are warm in the page cache for every method.

Streamed `.npz` members and lean argmax have cases of their own (`npz_cases`): a
256³ float32 `.npz`, and 4x256³ float16 softmax maps (a channels-first `.npz`, and
a (C, Z, Y, X) `.npy` read with `axis_order = "zyx"`) arg-maxed, against the time of
compressing their `keep` output alone ("compress only": the same writer, level and
threads, the bytes already in memory).

    python -m benchmarks convert            # or: python -m benchmarks.bench_convert
    python -m benchmarks.bench_convert --repeat 5 --size 256
"""

from __future__ import annotations

import argparse
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
ARGMAX_TIME_BAR = 1.5  # argmax at most this many times the keep output's compress-only time
SOFTMAX_CHANNELS = 4
SMALL_ARRAY = 8 * 2**20  # below this, memory ÷ array size is not shown
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
    reference_image(folder / "small.nii.gz", (64,) * 3, 1.0)
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


# The methods (run in the child).


def niftidrop_method(**options: Any) -> Callable[[Path, Path, Path], Path]:
    from niftidrop.api import convert_file
    from niftidrop.settings import Settings

    settings = Settings.model_validate(options)

    def convert(source: Path, reference: Path, out: Path) -> Path:
        return convert_file(source, out, settings=settings, reference=reference).outputs[0]

    return convert


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


def nidataset_method() -> Callable[[Path, Path, Path], Path]:
    # Imported here, before the clock starts: nidataset's imports are not its speed.
    from nidataset.transforms import numpy_to_nifti

    def convert(source: Path, reference: Path, out: Path) -> Path:
        return Path(numpy_to_nifti(str(source), str(out), reference_nifti=str(reference)))

    return convert


class CompressOnly:
    """The writer alone (gzip, level, threads, fsync as configured) on the bytes of
    `source`'s `keep` output, made and held in memory by `prepare`, before the clock."""

    def __init__(self) -> None:
        from niftidrop.settings import Settings

        self.settings = Settings()
        self.data = b""

    def prepare(self, source: Path, reference: Path, out: Path) -> None:
        from niftidrop.api import convert_file
        from niftidrop.settings import Settings

        plain = Settings(compress=False, fsync=False)
        done = convert_file(source, out / "plain", settings=plain, reference=reference)
        self.data = done.outputs[0].read_bytes()
        done.outputs[0].unlink()

    def __call__(self, source: Path, reference: Path, out: Path) -> Path:
        from niftidrop.writer import write_temp

        data = memoryview(self.data)
        step = 4 * 2**20
        final = out / (source.name.removesuffix(source.suffix) + ".nii.gz")
        temp = write_temp(
            final,
            (data[at : at + step] for at in range(0, len(data), step)),
            compress=True,
            level=self.settings.compression_level,
            threads=self.settings.threads,
            fsync=self.settings.fsync,
            size=len(data),
        )
        temp.path.replace(final)
        return final


METHODS: dict[str, Callable[[], Callable[[Path, Path, Path], Path]]] = {
    "niftidrop": niftidrop_method,
    "niftidrop argmax": lambda: niftidrop_method(channels="argmax"),
    "niftidrop argmax, zyx": lambda: niftidrop_method(channels="argmax", axis_order="zyx"),
    "compress only": CompressOnly,
    "niftidrop, fsync off": lambda: niftidrop_method(fsync=False),
    "nib.save": lambda: nib_save,
    "nidataset": nidataset_method,
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
    convert = METHODS[method]()
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(convert, CompressOnly):
        convert.prepare(source, reference, out)
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


def best_of(runs: int, *args: Any) -> dict[str, Any]:
    """The fastest of `runs` fresh children (as timeit does: slower runs only add other
    processes' noise); memory is the worst seen."""
    results = [run_child(*args) for _ in range(runs)]
    summary = dict(results[0])
    summary["seconds"] = min(r["seconds"] for r in results)
    summary["peak_above_idle"] = max(r["peak_above_idle"] for r in results)
    return summary


def measure(folder: Path, runs: int) -> tuple[list[list[str]], list[tuple[str, bool]]]:
    """Every case: table rows and the bars with their verdicts."""
    cases = [
        ("256³ float32 .npy, C order", "prob_c.npy", "scan.nii.gz", 1),
        ("256³ float32 .npy, Fortran order", "prob_f.npy", "scan.nii.gz", 1),
        ("64³ uint8 label map (per file)", "labels.npy", "small.nii.gz", LABEL_FILES),
        ("4x160³ float32 softmax, channels first", "softmax.npy", "mid.nii.gz", 1),
    ]
    rows: list[list[str]] = []
    bars: list[tuple[str, bool]] = []
    for title, name, reference, repeat in cases:
        methods = ["niftidrop", "nib.save", "nidataset"]
        if name == "labels.npy":  # small files: the two fsyncs per output show
            methods.insert(1, "niftidrop, fsync off")
        if name == "softmax.npy":
            methods = ["niftidrop", "niftidrop argmax", "nib.save"]
        results = {
            method: best_of(
                runs, method, folder / name, folder / reference, folder / "out" / method, repeat
            )
            for method in methods
        }
        baseline = results["nib.save"]["seconds"]
        for method, result in results.items():
            rows.append(_row(title, method, result, baseline))
        ours = results["niftidrop"]
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
    npz_rows, npz_bars = npz_cases(folder, runs)
    return rows + npz_rows, bars + npz_bars


def npz_cases(folder: Path, runs: int) -> tuple[list[list[str]], list[tuple[str, bool]]]:
    """Streamed .npz members and lean argmax: memory and time bars."""
    rows: list[list[str]] = []
    bars: list[tuple[str, bool]] = []
    out = folder / "out"

    def run(method: str, name: str, reference: str) -> dict[str, Any]:
        return best_of(runs, method, folder / name, folder / reference, out / method, 1)

    title = "256³ float32 .npz (deflated), C order"
    results = {m: run(m, "prob.npz", "scan.nii.gz") for m in ("niftidrop", "nib.save")}
    for method, result in results.items():
        rows.append(_row(title, method, result, results["nib.save"]["seconds"]))
    share = results["niftidrop"]["peak_above_idle"] / results["niftidrop"]["array_bytes"]
    bars.append(
        (
            f"{title}: peak above idle {share:.2f}x the array (bar {MEMORY_BAR:g}x)",
            share <= MEMORY_BAR,
        )
    )
    softmax = f"{SOFTMAX_CHANNELS}x256³ float16 softmax"
    compress = run("compress only", "softmax16.npz", "scan.nii.gz")
    rows.append(_row(f"{softmax}, keep output", "compress only", compress, None))
    for title, method, name in (
        (f"{softmax} .npz, channels first", "niftidrop argmax", "softmax16.npz"),
        (f"{softmax} .npy (C, Z, Y, X), zyx", "niftidrop argmax, zyx", "softmax16_zyx.npy"),
    ):
        result = run(method, name, "scan.nii.gz")
        rows.append(_row(title, method, result, None))
        share = result["peak_above_idle"] / result["array_bytes"]
        ratio = result["seconds"] / compress["seconds"]
        bars.append(
            (
                f"{title} argmax: peak above idle {share:.2f}x the array (bar {MEMORY_BAR:g}x)",
                share <= MEMORY_BAR,
            )
        )
        bars.append(
            (
                f"{title} argmax: {ratio:.2f}x the keep output's compress-only time "
                f"(bar {ARGMAX_TIME_BAR:g}x)",
                ratio <= ARGMAX_TIME_BAR,
            )
        )
    return rows, bars


def _row(title: str, method: str, result: dict[str, Any], baseline: float | None) -> list[str]:
    seconds = result["seconds"]
    share = result["peak_above_idle"] / result["array_bytes"]
    shown = f"{seconds * 1e3:.1f} ms" if seconds < 0.1 else f"{seconds:.2f} s"
    return [
        title,
        method,
        shown,
        f"{baseline / seconds:.1f}x" if baseline else "n/a",
        f"{result['peak_above_idle'] / 2**20:.0f} MiB",
        # For small arrays the fixed overhead (threads, buffers) dominates the ratio.
        f"{share:.2f}x" if result["array_bytes"] >= SMALL_ARRAY else "n/a",
        result["dtype_out"],
        f"{result['max_abs_error']:.3g}",
        f"{result['output_bytes'] / 2**20:.1f} MiB",
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


def print_table(rows: list[list[str]]) -> None:
    """A Markdown table, ready for the README."""
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    for line in [HEADER, ["-" * w for w in widths], *rows]:
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
    print(f"conversion benchmark: {os.cpu_count()} CPUs, best of {args.runs} runs each")
    with tempfile.TemporaryDirectory(prefix="niftidrop-bench-") as temp:
        folder = Path(temp)
        build_inputs(folder, args.size)
        rows, bars = measure(folder, args.runs)
    print_table(rows)
    for text, passed in bars:
        print(f"{'PASS' if passed else 'FAIL'}  {text}")
    return 0 if all(passed for _, passed in bars) else 1


if __name__ == "__main__":
    sys.exit(main())
