"""Streamed `.npz` members: the values NumPy reads, in few passes, with pages freed."""

from __future__ import annotations

import contextlib
import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from niftidrop import argmax, members, slabs
from niftidrop.api import convert_file
from niftidrop.arrays import open_input
from niftidrop.conversion import Plan, arrange, encode_volume, plan_conversion
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.reference import read_reference
from niftidrop.settings import Settings

LIMIT = 1 << 30
SPATIAL = (5, 3, 7)
DTYPES = [
    "|b1",
    "|i1",
    "|u1",
    "<i2",
    ">u2",
    "<i4",
    "<u4",
    "<i8",
    "<u8",
    "<f2",
    ">f4",
    "<f8",
    "<c8",
    "<c16",
]
FLOAT_VALUES = [0.0, -0.0, 1.0, 0.5, -2.0, np.inf, -np.inf, np.nan]
SAVERS: dict[str, Callable[..., None]] = {"stored": np.savez, "deflated": np.savez_compressed}


@contextlib.contextmanager
def small_steps() -> Iterator[None]:
    """Slabs, pieces, fills and releases of a few hundred bytes or less, so that small
    arrays take many of each (memory is still freed in whole pages)."""
    with contextlib.ExitStack() as stack:
        for module, name, value in [
            (slabs, "SLAB_BYTES", 300),
            (slabs, "PIECE_BYTES", 200),
            (slabs, "STREAM_PIECE_BYTES", 200),
            (argmax, "PIECE_BYTES", 200),
            (members, "FILL_BYTES", 500),
            (members, "_MIN_FILL", 100),
            (members, "_HELD_STEP", 64),
        ]:
            stack.enter_context(mock.patch.object(module, name, value))
        yield


def encoded(plan: Plan, source: Any) -> list[bytes]:
    """The voxel bytes of every planned volume (headers dropped)."""
    out = []
    for volume in plan.volumes:
        data = b"".join(bytes(chunk) for chunk in encode_volume(volume, source))
        out.append(data[len(data) - volume.data_bytes :])
    return out


def expected_bytes(plan: Plan, values: np.ndarray, axis_order: str, channels: str) -> list[bytes]:
    """What NumPy makes of `values`: arranged, arg-maxed or split, cast, in Fortran order."""
    arranged = arrange(values, SPATIAL, axis_order, "x")  # type: ignore[arg-type]
    has_channels = arranged.ndim > len(SPATIAL)
    if channels == "argmax" and has_channels:
        parts = [np.argmax(arranged, axis=-1)]
    elif channels == "split" and has_channels:
        parts = [arranged[..., c] for c in range(arranged.shape[-1])]
    else:
        parts = [arranged]
    return [
        part.astype(volume.dtype).tobytes(order="F")
        for part, volume in zip(parts, plan.volumes, strict=True)
    ]


@st.composite
def inputs(draw: st.DrawFn) -> tuple[np.ndarray, str, str, str]:
    """(array, member storage, axis_order, channels): every dtype, order and channel place."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    axis_order = draw(st.sampled_from(["xyz", "zyx"]))
    spatial = SPATIAL[::-1] if axis_order == "zyx" else SPATIAL
    place = draw(st.sampled_from(["none", "first", "last"]))
    count = draw(st.integers(2, 3))
    shape = {"none": spatial, "first": (count, *spatial), "last": (*spatial, count)}[place]
    if dtype.kind == "f":
        elements: st.SearchStrategy[Any] = st.sampled_from(FLOAT_VALUES)
    elif dtype.kind == "c":
        elements = st.builds(complex, st.sampled_from([0.0, 1.0, np.nan]), st.just(0.0))
    elif dtype.kind == "b":
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.sampled_from([int(info.min), 0, 1, 2, int(info.max)])
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    if draw(st.booleans()):
        array = np.asfortranarray(array)
    channels = draw(st.sampled_from(["keep", "argmax", "split"]))
    return array, draw(st.sampled_from(sorted(SAVERS))), axis_order, channels


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A reference of shape SPATIAL, read once for the module."""
    path = tmp_path_factory.mktemp("reference") / "scan.nii"
    nib.save(nib.Nifti1Image(np.zeros(SPATIAL, np.int16), np.eye(4)), path)
    return read_reference(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the property tests write their inputs (Hypothesis reuses it)."""
    return tmp_path_factory.mktemp("inputs")


class TestSameAsNumpy:
    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(inputs())
    def test_streamed_members_convert_as_numpy_reads_them(
        self, reference: Any, folder: Path, case: tuple[np.ndarray, str, str, str]
    ) -> None:
        """Streamed in small steps, every dtype, order, storage, channel place, axis
        order and `channels` gives the bytes np.load + NumPy's own argmax give."""
        array, storage, axis_order, channels = case
        path = folder / "case.npz"
        SAVERS[storage](path, x=array)
        with small_steps():
            source = open_input(path, npz_key=None, max_input_bytes=LIMIT)
            plan = plan_conversion(source, reference, axis_order=axis_order, channels=channels)  # type: ignore[arg-type]
            got = encoded(plan, source)
            source.verify()
        with np.load(path) as loaded:
            assert got == expected_bytes(plan, loaded["x"], axis_order, channels)

    @settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
    @given(inputs())
    def test_mapped_npy_argmax_is_numpys(
        self, reference: Any, folder: Path, case: tuple[np.ndarray, str, str, str]
    ) -> None:
        """A mapped .npy, arg-maxed per slab by channels, gives NumPy's labels."""
        array, _, axis_order, _ = case
        path = folder / "case.npy"
        np.save(path, array)
        with small_steps():
            source = open_input(path, npz_key=None, max_input_bytes=LIMIT)
            plan = plan_conversion(source, reference, axis_order=axis_order, channels="argmax")  # type: ignore[arg-type]
            got = encoded(plan, source)
        assert got == expected_bytes(plan, np.load(path), axis_order, "argmax")


def _passes(path: Path, reference: Any, **options: Any) -> int:
    source = open_input(path, npz_key=None, max_input_bytes=LIMIT)
    plan = plan_conversion(source, reference, **options)
    encoded(plan, source)
    assert source.stream is not None
    return source.stream.passes


class TestPasses:
    @pytest.mark.parametrize("storage", sorted(SAVERS))
    def test_a_layout_in_output_order_is_read_once(
        self, reference: Any, tmp_path: Path, storage: str
    ) -> None:
        """Fortran order (x, y, z) and C order read as z, y, x are decompressed once."""
        values = np.arange(np.prod(SPATIAL), dtype=np.float32).reshape(SPATIAL)
        SAVERS[storage](tmp_path / "f.npz", x=np.asfortranarray(values))
        SAVERS[storage](tmp_path / "c.npz", x=np.ascontiguousarray(values.T))
        with small_steps():
            assert _passes(tmp_path / "f.npz", reference) == 1
            assert _passes(tmp_path / "c.npz", reference, axis_order="zyx") == 1

    def test_a_transposing_layout_is_read_once_per_slab_group(self, tmp_path: Path) -> None:
        """A C-order x, y, z member is decompressed once per group of slabs."""
        # 60 z-planes, each 1/60 of the array: slabs of 10 planes, 1/6 of it.
        np.savez_compressed(tmp_path / "c.npz", x=np.zeros((24, 10, 60), np.float64))
        with small_steps():
            assert _passes(tmp_path / "c.npz", None) == slabs.STREAM_SLAB_FRACTION

    def test_channels_first_argmax_reads_each_channel_once(
        self, reference: Any, tmp_path: Path
    ) -> None:
        """Channels first, C order, arg-maxed: one pass, whatever the spatial order."""
        np.savez_compressed(tmp_path / "p.npz", x=np.zeros((3, *SPATIAL), np.float16))
        with small_steps():
            assert _passes(tmp_path / "p.npz", reference, channels="argmax") == 1

    def test_an_int64_range_scan_is_a_pass_of_its_own(self, reference: Any, tmp_path: Path) -> None:
        """int64 under dtype "auto" is scanned for its range first: two passes."""
        np.savez(tmp_path / "i.npz", x=np.asfortranarray(np.ones(SPATIAL, np.int64)))
        with small_steps():
            assert _passes(tmp_path / "i.npz", reference) == 2

    def test_data_reads_the_member_whole(self, tmp_path: Path) -> None:
        """`data` of a streamed member is the whole array, readable in any way."""
        values = np.random.default_rng(1).random((6, 7, 8))
        np.savez_compressed(tmp_path / "r.npz", x=values)
        source = open_input(tmp_path / "r.npz", npz_key=None, max_input_bytes=LIMIT)
        np.testing.assert_array_equal(source.data[::-1, 3], values[::-1, 3])


def _memfd_resident_kib() -> int:
    """Resident KiB of this process's streamed-member buffers (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
            inside = "memfd:niftidrop-member" in line
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


class TestMemory:
    @pytest.mark.parametrize("order", ["F", "C"])
    def test_a_streamed_member_holds_about_a_slab(self, tmp_path: Path, order: str) -> None:
        """Converting a 32 MiB member keeps under a quarter of it resident in its
        buffer, read in the file's order (F) and transposed (C)."""
        values = np.random.default_rng(2).random((128, 128, 256)).astype(np.float64)
        np.savez(tmp_path / "m.npz", x=values if order == "C" else np.asfortranarray(values))
        source = open_input(tmp_path / "m.npz", npz_key=None, max_input_bytes=LIMIT)
        plan = plan_conversion(source, None)
        peak = 0
        for _ in encode_volume(plan.volumes[0], source):
            peak = max(peak, _memfd_resident_kib())
        assert 0 < peak * 1024 < values.nbytes / 4


def _set_crc(path: Path, crc: int) -> None:
    """Write `crc` into the one member's local header and central directory entry."""
    raw = bytearray(path.read_bytes())
    packed = struct.pack("<L", crc)
    raw[14:18] = packed
    central = raw.rindex(b"PK\x01\x02")
    raw[central + 16 : central + 20] = packed
    path.write_bytes(bytes(raw))


def _member_with_sizes(path: Path, *, declared: int, actual: int) -> None:
    """A deflated member whose header and zip entry say `declared` values, holding `actual`."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        stream, {"descr": "|u1", "fortran_order": False, "shape": (declared,)}
    )
    payload = stream.getvalue() + bytes(range(256)) * (actual // 256) + bytes(actual % 256)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", payload)
    size = len(stream.getvalue()) + declared
    crc = zlib.crc32(payload[:size])
    raw = bytearray(path.read_bytes())
    central = raw.rindex(b"PK\x01\x02")
    for at in (14, central + 16):
        raw[at : at + 4] = struct.pack("<L", crc)
    for at in (22, central + 24):
        raw[at : at + 4] = struct.pack("<L", size)
    path.write_bytes(bytes(raw))


class TestChecks:
    @pytest.mark.parametrize("storage", sorted(SAVERS))
    def test_a_bad_crc_fails_the_input_and_commits_nothing(
        self, tmp_path: Path, storage: str
    ) -> None:
        """A member whose CRC-32 does not match is CORRUPT once streamed to its end, and
        neither an output nor a temporary file is left in the outbox."""
        path = tmp_path / "bad.npz"
        SAVERS[storage](path, x=np.random.default_rng(3).random((40, 50, 60)))
        with zipfile.ZipFile(path) as archive:
            crc = archive.infolist()[0].CRC
        _set_crc(path, crc ^ 1)
        out = tmp_path / "out"
        with pytest.raises(ConversionError) as caught:
            convert_file(path, out, settings=Settings(), reference=None)
        assert caught.value.code is ErrorCode.CORRUPT
        assert "CRC-32" in str(caught.value)
        assert list(out.iterdir()) == []

    @pytest.mark.parametrize(
        ("declared", "actual", "found"),
        [(1000, 5000, "more than its declared"), (5000, 1000, "bytes of values, found")],
        ids=["longer (a zip bomb)", "shorter"],
    )
    def test_a_member_must_decompress_to_its_declared_size(
        self, tmp_path: Path, declared: int, actual: int, found: str
    ) -> None:
        """A member that decompresses to more or fewer bytes than declared is CORRUPT."""
        path = tmp_path / "liar.npz"
        _member_with_sizes(path, declared=declared, actual=actual)
        source = open_input(path, npz_key=None, max_input_bytes=LIMIT)
        with pytest.raises(ConversionError) as caught:
            source.verify()
        assert caught.value.code is ErrorCode.CORRUPT
        assert found in str(caught.value)

    def test_a_member_past_the_end_of_the_file_is_corrupt(self, tmp_path: Path) -> None:
        """A directory entry whose data would run past the file's end is CORRUPT."""
        path = tmp_path / "past.npz"
        np.savez(path, x=np.zeros(1000))
        raw = bytearray(path.read_bytes())
        central = raw.rindex(b"PK\x01\x02")
        raw[central + 42 : central + 46] = struct.pack("<L", len(raw) - 200)
        path.write_bytes(bytes(raw))
        with pytest.raises(ConversionError) as caught:
            open_input(path, npz_key=None, max_input_bytes=LIMIT)
        assert caught.value.code is ErrorCode.CORRUPT
