"""Fuzzing every path that reads an inbox file: the readiness check, `open_input` and
the conversion, on random bytes, hand-written headers and valid `.npy` / `.npz` files
with their header, length fields, zip local headers, central directory and end
record damaged.

Property, for every file: the readiness check returns a verdict (never raises);
opening and converting give a result or a `ConversionError` with a documented code,
never another exception; no call takes more than `CALL_SECONDS`; no call allocates
more than `MEMORY_BOUND` (with `max_input_bytes` small, so a file declaring more is
refused before anything is allocated).

`make test` runs the default profile (a fixed, reproducible set of examples).
`python -m benchmarks fuzz` runs the long profile: `FUZZ_EXAMPLES` examples
in all, drawn at random, every finding kept (its bytes saved) instead of stopping at
the first, and a report written to `FUZZ_REPORT`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import fuzzing
from niftidrop.api import convert_file
from niftidrop.arrays import open_input
from niftidrop.completeness import Readiness, readiness
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.settings import Settings, load_settings

T = TypeVar("T")

MAX_INPUT_BYTES = 64 * 1024
# A conversion holds the input, a cast copy and the encoded output: a few times the
# input at most, plus what reading the reference and writing the NIfTI header take.
MEMORY_BOUND = 8 * MAX_INPUT_BYTES + 2 * 1024 * 1024
CALL_SECONDS = 10.0

# Read at import: the test fixtures clear the environment.
LONG = "FUZZ_EXAMPLES" in os.environ
TOTAL_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2400"))
REPORT = os.environ.get("FUZZ_REPORT")
FINDINGS = os.environ.get("FUZZ_FINDINGS")
# Each test's share of the examples.
SHARES = {"random": 1, "headers": 1, "npy": 2, "npz": 2}


def fuzz_settings(family: str) -> hypothesis_settings:
    """The default profile is derandomized (the same examples on every run, no database);
    the long one is random, so every run explores new files."""
    examples = -(-TOTAL_EXAMPLES * SHARES[family] // sum(SHARES.values()))  # rounded up
    return hypothesis_settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not LONG,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


class CallTooSlow(Exception):
    """A call on a fuzzed file ran past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise CallTooSlow in the block after `seconds`, keeping pytest-timeout's timer."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise CallTooSlow(f"took more than {seconds} s")

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_timer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer:
            left = previous_timer - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))


class Fuzzer:
    """Runs each fuzzed file through every reader and checks the property."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.outbox = folder / "outbox"
        self.outbox.mkdir()
        self.findings_folder = Path(FINDINGS) if FINDINGS else folder / "found"
        reference = folder / "reference.nii.gz"
        data = np.arange(int(np.prod(fuzzing.REFERENCE_SHAPE)), dtype=np.int16)
        nib.save(nib.Nifti1Image(data.reshape(fuzzing.REFERENCE_SHAPE), np.eye(4)), reference)
        self.reference = reference
        self.settings: Settings = load_settings(
            root=folder, fsync=False, compression_threads=1, max_input_bytes=MAX_INPUT_BYTES
        )
        self.examples: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.findings: list[str] = []
        self.started = time.monotonic()

    def check(self, family: str, name: str, content: bytes) -> None:
        """The property for one file; a violation fails the test (default profile) or is
        recorded and saved (long profile)."""
        self.examples[family] += 1
        path = self.folder / name
        path.write_bytes(content)
        try:
            self._check(path)
        except AssertionError as problem:
            if not LONG:
                raise
            self._keep(family, name, content, problem)
        self._progress()

    def _progress(self) -> None:
        """In the long profile, the report so far every 1,000 files (a run can be cut)."""
        if REPORT and sum(self.examples.values()) % 1000 == 0:
            Path(REPORT).write_text(json.dumps(self.report(), indent=2))

    def _check(self, path: Path) -> None:
        verdict = self._bounded("readiness", lambda: readiness(path))
        # The file is readable and stays put: only its bytes decide.
        assert verdict in (Readiness.COMPLETE, Readiness.INCOMPLETE, Readiness.NEVER), verdict
        self.outcomes[f"readiness:{verdict.value}"] += 1
        opened = self._bounded("open_input", lambda: self._outcome(self._open, path))
        converted = self._bounded("convert_file", lambda: self._outcome(self._convert, path))
        self.outcomes[f"converted:{converted}"] += 1
        if verdict is Readiness.COMPLETE and path.suffix == ".npy":
            # A .npy called complete has every declared byte: never truncated.
            assert opened != ErrorCode.TRUNCATED.value, (verdict, opened)

    def _open(self, path: Path) -> None:
        array = open_input(path, npz_key=None, max_input_bytes=MAX_INPUT_BYTES)
        assert array.data.nbytes <= MAX_INPUT_BYTES
        del array

    def _convert(self, path: Path) -> None:
        convert_file(path, self.outbox, settings=self.settings, reference=self.reference)

    @staticmethod
    def _outcome(call: Callable[[Path], None], path: Path) -> str:
        try:
            call(path)
        except ConversionError as error:
            return ErrorCode(error.code).value  # a documented code, or ValueError
        except CallTooSlow:
            raise
        except Exception as error:
            raise AssertionError(f"{type(error).__name__}: {error}") from error
        return "ok"

    def _bounded(self, what: str, call: Callable[[], T]) -> T:
        """`call()` under a deadline, measuring what it allocates (numpy reports its
        buffers to tracemalloc too). Tracing only the call keeps Hypothesis fast."""
        tracemalloc.start()
        try:
            with deadline(CALL_SECONDS):
                result = call()
            _, peak = tracemalloc.get_traced_memory()
        except CallTooSlow as slow:
            raise AssertionError(f"{what}: {slow}") from None
        finally:
            tracemalloc.stop()
        assert peak <= MEMORY_BOUND, f"{what}: allocated {peak} bytes"
        return result

    def _keep(self, family: str, name: str, content: bytes, problem: AssertionError) -> None:
        self.findings_folder.mkdir(parents=True, exist_ok=True)
        saved = self.findings_folder / f"{family}-{len(self.findings):04d}{Path(name).suffix}"
        saved.write_bytes(content)
        self.findings.append(f"{saved.name}: {problem}")

    def report(self) -> dict[str, Any]:
        return {
            "examples": sum(self.examples.values()),
            "by_family": dict(self.examples),
            "outcomes": dict(sorted(self.outcomes.items())),
            "findings": self.findings,
            "seconds": round(time.monotonic() - self.started, 1),
        }


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Fuzzer:
    return Fuzzer(tmp_path_factory.mktemp("fuzz"))


SUFFIXES = st.sampled_from([".npy", ".npz", ".NPY", ".Npz"])
OPERATIONS = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 1 << 20), st.integers(0, 1 << 20)),
    min_size=1,
    max_size=4,
)


def base_files(count: int) -> tuple[list[bytes], list[bytes]]:
    """Valid .npy and .npz files to damage: every shape, dtype, order and format
    version (built once: building them per example would cost more than the check)."""
    npy, npz = [], []
    shapes = fuzzing.FITTING_SHAPES + fuzzing.OTHER_SHAPES
    for number in range(count):
        shape = shapes[number % len(shapes)]
        dtype = fuzzing.DTYPES[number % len(fuzzing.DTYPES)]
        array = fuzzing.array_of(shape, dtype, number)
        if number % 3 == 0:
            array = np.asfortranarray(array)
        npy.append(fuzzing.npy_bytes(array, [(1, 0), (2, 0), (3, 0)][number % 3]))
        members = [array] + [fuzzing.array_of((3,), "<f8", number)] * (number % 3)
        npz.append(fuzzing.npz_bytes(members, compressed=number % 2 == 0))
    return npy, npz


BASE_NPY, BASE_NPZ = base_files(120)


@st.composite
def header_values(draw: st.DrawFn) -> tuple[str, object, object]:
    """Header dict values, often invalid: odd descrs, orders and huge or negative dims."""
    descr = draw(
        st.one_of(
            st.sampled_from([*fuzzing.DTYPES, "<f16", "|O", "<U4", "|V8", "<M8[s]", "", "<"]),
            st.text(max_size=6),
        )
    )
    order = draw(st.sampled_from([True, False, 0, 1, None, "False"]))
    dims = st.one_of(
        st.integers(-2, 8),
        st.integers(-(2**70), 2**70),
        st.sampled_from([2**31, 2**32, 2**63, 2**64]),
    )
    shape = draw(
        st.one_of(
            st.lists(dims, max_size=8).map(tuple),
            st.sampled_from([fuzzing.REFERENCE_SHAPE, (4, 5, 6, 2)]),
            st.integers(),
            st.text(max_size=4),
        )
    )
    return descr, order, shape


class TestFuzzInputs:
    @fuzz_settings("random")
    @given(suffix=SUFFIXES, content=st.binary(max_size=4096))
    def test_random_bytes(self, fuzzer: Fuzzer, suffix: str, content: bytes) -> None:
        """Arbitrary bytes under an input's name: a verdict, a conversion or a coded error."""
        fuzzer.check("random", f"case{suffix}", content)

    @fuzz_settings("headers")
    @given(
        values=header_values(),
        padding=st.integers(0, 80),
        version=st.sampled_from([1, 2, 3]),
        length=st.one_of(st.none(), st.sampled_from(fuzzing.BOUNDARY_VALUES)),
        data=st.one_of(st.binary(max_size=600), st.integers(0, 2000).map(bytes)),
    )
    def test_hand_written_headers(  # noqa: PLR0917 (one argument per drawn value)
        self,
        fuzzer: Fuzzer,
        values: tuple[str, object, object],
        padding: int,
        version: int,
        length: int | None,
        data: bytes,
    ) -> None:
        """Headers numpy never writes (huge, negative or odd values; wrong length fields)."""
        text = fuzzing.header_text(*values, padding)
        fuzzer.check("headers", "case.npy", fuzzing.npy_with_header(text, data, version, length))

    @fuzz_settings("npy")
    @given(content=st.sampled_from(BASE_NPY), operations=OPERATIONS)
    def test_mutated_npy(
        self, fuzzer: Fuzzer, content: bytes, operations: list[tuple[int, int, int]]
    ) -> None:
        """Valid .npy files with bytes flipped, cut, inserted and length fields overwritten."""
        fuzzer.check("npy", "case.npy", fuzzing.mutate(content, operations))

    @fuzz_settings("npz")
    @given(content=st.sampled_from(BASE_NPZ), operations=OPERATIONS)
    def test_mutated_npz(
        self, fuzzer: Fuzzer, content: bytes, operations: list[tuple[int, int, int]]
    ) -> None:
        """Valid .npz files with local headers, directory entries and end record damaged."""
        fuzzer.check("npz", "case.npz", fuzzing.mutate(content, operations))

    def test_enough_files_went_through(
        self, fuzzer: Fuzzer, request: pytest.FixtureRequest
    ) -> None:
        """Every file above went through readiness, opening and conversion: at least 2,000."""
        report = fuzzer.report()
        print(f"\nfuzz: {json.dumps(report)}")
        if REPORT:
            Path(REPORT).write_text(json.dumps(report, indent=2))
        if set(fuzzer.examples) != set(SHARES):
            pytest.skip("only part of the fuzz tests ran")
        assert report["findings"] == []
        assert report["examples"] >= min(TOTAL_EXAMPLES, 2000) - len(SHARES)
        assert report["outcomes"].get("converted:ok", 0) > 0  # the valid ones still convert
