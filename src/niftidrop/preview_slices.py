"""What a preview shows, read cheaply: the centre of the prediction and three slices.

The prediction is the conversion's own output view (a memory-mapped `.npy` or an
`.npz` member in memory), so nothing is loaded whole: one pass over it in the
order its bytes lie finds which slices hold non-zero voxels (block maxima only,
the pages dropped after each block), and then three slices are taken through
the centre. The reference is read as three slices too: from a memory map of an
uncompressed `.nii` (nibabel's array proxy, `mmap`), or, for `.nii.gz`, in one
streamed pass of ISA-L's gzip reader that keeps only those slices (a gzip
stream cannot seek, and the sagittal slice has voxels in every part of it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import isal.igzip
import numpy as np
import numpy.typing as npt

from niftidrop.conversion import Plan, Volume
from niftidrop.reference import SPATIAL, nib

Array = npt.NDArray[Any]
igzip: Any = isal.igzip  # ISA-L ships without type hints
# Blocks of the centre pass and of the streamed reference: a few MiB each.
BLOCK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Prediction:
    """The 3-D values a preview overlays: one channel, or several shown by their argmax.

    `channels` are x, y, z views of the output (no copies): the output itself when
    it is 3-D, else each of its channels (`channels = "keep"`, `"argmax"`'s scores,
    `"vector"`'s components, `"split"`'s outputs), of which the preview shows the
    index of the largest, as `channels = "argmax"` would.
    """

    channels: tuple[Array, ...]
    labels: bool  # integer values (a label map): one colour per value; else a heat map

    @property
    def shape(self) -> tuple[int, int, int]:
        x, y, z = self.channels[0].shape
        return (int(x), int(y), int(z))

    def values(self, index: tuple[slice | int, ...]) -> Array:
        """The values shown at `index` (the argmax of the channels when there are several)."""
        if len(self.channels) == 1:
            return np.asarray(self.channels[0][index])
        scores = np.stack([channel[index] for channel in self.channels], axis=-1)
        winner: Array = np.argmax(scores, axis=-1)
        return winner


def prediction_of(volumes: Sequence[Volume]) -> Prediction:
    """The `Prediction` of a conversion's output volumes (its plan's `volumes`)."""
    channels: list[Array] = []
    for volume in volumes:
        spatial = (slice(None),) * SPATIAL
        for rest in np.ndindex(volume.source.shape[SPATIAL:]):
            channels.append(volume.source[(*spatial, *rest)])
    if len(channels) > 1:
        return Prediction(tuple(channels), labels=True)
    # Complex outputs are shown by their real part's magnitude, bool as labels 0/1.
    kind = volumes[0].dtype.kind
    return Prediction(tuple(channels), labels=kind in "biu")


def occupied_centre(
    prediction: Prediction, release: Callable[[], None] = lambda: None
) -> tuple[int, int, int] | None:
    """The middle of the slices that hold non-zero voxels, per axis; None if there are none.

    Per axis it is the mean index of the slices with at least one non-zero voxel:
    the centre of the prediction's extent for one structure, and one stray voxel
    far away moves it by about one slice for each slice it adds (a bounding box's
    centre would jump halfway). Only block maxima are computed, so the pass costs
    little more than reading the prediction once; `release` is called after each
    block (to drop the pages of a mapped input).
    """
    first = prediction.channels[0]
    # The axes in the order the bytes lie (slowest first): each block is then read,
    # and reduced, front to back.
    order = sorted(
        range(SPATIAL), key=lambda axis: (first.shape[axis] == 1, -abs(first.strides[axis]))
    )
    slowest, others = order[0], order[1:]
    plane = max(1, first.itemsize * len(prediction.channels) * first.size // first.shape[slowest])
    step = max(1, BLOCK_BYTES // plane)
    along = np.zeros(first.shape[slowest], dtype=bool)
    across: Array | None = None  # the other two axes (in order): any along `slowest`
    for start in range(0, first.shape[slowest], step):
        index = tuple(
            slice(start, start + step) if axis == slowest else slice(None)
            for axis in range(SPATIAL)
        )
        rows = _rows(prediction.values(index).transpose(order))
        along[start : start + step] = rows.max(axis=1) != 0
        flat = np.bitwise_or.reduce(rows, axis=0)
        across = flat if across is None else np.bitwise_or(across, flat, out=across)
        release()
    if across is None or not along.any():
        return None
    voxels = across.view(np.uint8).reshape(first.shape[others[0]], first.shape[others[1]], -1)
    occupied = voxels.max(axis=2) != 0
    profiles = {slowest: along, others[0]: occupied.any(axis=1), others[1]: occupied.any(axis=0)}
    return (_middle(profiles[0]), _middle(profiles[1]), _middle(profiles[2]))


def _rows(values: Array) -> Array:
    """`values` (slowest axis first) as one row of unsigned words per index of that axis,
    non-zero exactly where a voxel is: the raw bytes of integers, `!= 0` of floats
    (so -0.0 counts as zero), read 8 bytes at a time where the row allows it."""
    if values.dtype.kind in "fc":
        values = values != 0
    values = np.ascontiguousarray(values)  # a copy only for a view that is not in file order
    raw = values.view(np.uint8).reshape(values.shape[0], -1)
    return raw.view(np.uint64) if raw.shape[1] % 8 == 0 else raw


def _middle(profile: npt.ArrayLike) -> int:
    """The mean index of the true entries of `profile` (it has some)."""
    return round(float(np.flatnonzero(profile).mean()))


class OutputWatch:
    """Which slices of a 3-D output hold non-zero voxels, seen as its bytes pass to the writer.

    `watch(chunks)` passes `encode_volume`'s chunks on unchanged, reducing each one
    while it is in the cache: the cheapest way to the centre, as the conversion
    reads the prediction anyway. The chunks are the file's voxels in Fortran
    order, so each is a run of x-y planes (or of part of one). Whole planes are
    reduced as 8-byte words: one OR per plane says which hold a voxel, and only the
    planes from the first to the last of those are OR-ed together for x and y.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: np.dtype[Any]) -> None:
        self.shape = shape
        self.dtype = dtype
        self._plane = shape[0] * shape[1]
        # Floats are seen as `!= 0` (one byte a voxel, so -0.0 is zero); integers as
        # their raw bytes, which are all zero exactly where the value is.
        self._width = 1 if dtype.kind in "fc" else dtype.itemsize
        plane_bytes = self._plane * self._width
        self._across = np.zeros(plane_bytes, dtype=np.uint8)  # x-y: the OR along z
        # Whole planes are reduced 8 bytes at a time where a plane allows it.
        self._across_words = self._across.view(np.uint64) if plane_bytes % 8 == 0 else None
        self._along = np.zeros(shape[2], dtype=bool)  # z: any in the plane
        self._seen = 0  # voxels

    def __repr__(self) -> str:
        return f"OutputWatch(shape={self.shape}, seen={self._seen})"

    def watch(self, chunks: Iterable[memoryview | bytes]) -> Iterator[memoryview | bytes]:
        """`chunks` (a header, then voxels) unchanged, each voxel chunk reduced first."""
        stream = iter(chunks)
        yield next(stream)  # the header
        for chunk in stream:
            self._see(chunk)
            yield chunk

    def centre(self) -> tuple[int, int, int] | None:
        """As `occupied_centre`; ValueError if not every voxel was seen (an output that a
        crashed run had placed already is not written again)."""
        if self._seen != self._plane * self.shape[2]:
            raise ValueError(f"saw {self._seen} voxels of {self._plane * self.shape[2]}")
        if not self._along.any():
            return None
        voxels = self._across.reshape(self._plane, self._width).max(axis=1) != 0
        across: Array = voxels.reshape(self.shape[:2], order="F")
        return (_middle(across.any(axis=1)), _middle(across.any(axis=0)), _middle(self._along))

    def _see(self, chunk: memoryview | bytes) -> None:
        if self.dtype.kind in "fc":
            raw = (np.frombuffer(chunk, dtype=self.dtype) != 0).view(np.uint8)
        else:
            raw = np.frombuffer(chunk, dtype=np.uint8)
        plane_bytes = self._plane * self._width
        position, start = 0, self._seen * self._width  # in bytes
        self._seen += raw.size // self._width
        while position < raw.size:
            plane, within = divmod(start + position, plane_bytes)
            whole = (raw.size - position) // plane_bytes if within == 0 else 0
            if whole:
                self._see_planes(plane, raw[position : position + whole * plane_bytes])
                position += whole * plane_bytes
                continue
            part = raw[position : position + min(plane_bytes - within, raw.size - position)]
            self._along[plane] |= bool(part.max() != 0)
            self._across[within : within + part.size] |= part
            position += part.size

    def _see_planes(self, first: int, raw: Array) -> None:
        """Whole planes from plane `first` on: which hold a voxel, and the OR of those."""
        words = self._across_words
        block = raw.reshape(-1, self._across.size)
        if words is not None:
            block = block.view(np.uint64)
        along = np.bitwise_or.reduce(block, axis=1) != 0
        self._along[first : first + along.size] = along
        # Only the planes from the first to the last that hold a voxel can add to the OR.
        occupied = np.flatnonzero(along)
        if occupied.size:
            span = block[occupied[0] : occupied[-1] + 1]
            target = self._across if words is None else words
            target |= np.bitwise_or.reduce(span, axis=0)


def watch_output(plan: Plan) -> OutputWatch | None:
    """An `OutputWatch` for a plan whose one output is what the preview shows (a 3-D
    volume), else None (several channels: `occupied_centre` reads them after)."""
    if len(plan.volumes) != 1 or len(plan.volumes[0].shape) != SPATIAL:
        return None
    shape = plan.volumes[0].shape
    return OutputWatch((shape[0], shape[1], shape[2]), plan.volumes[0].dtype)


def watched(
    chunks: Iterable[memoryview | bytes], watch: OutputWatch | None
) -> Iterable[memoryview | bytes]:
    """`chunks`, through `watch` when there is one."""
    return chunks if watch is None else watch.watch(chunks)


def volume_centre(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The voxel in the middle of a volume of `shape`."""
    return (shape[0] // 2, shape[1] // 2, shape[2] // 2)


def cut(
    volume: Callable[[tuple[slice | int, ...]], Array], at: tuple[int, int, int]
) -> list[Array]:
    """The three slices through voxel `at`: fixed voxel axis 0, 1, 2 (x, y, z) in turn."""
    slices = []
    for axis in range(SPATIAL):
        index = tuple(at[axis] if a == axis else slice(None) for a in range(SPATIAL))
        slices.append(volume(index))
    return slices


# The reference.


def reference_slices(path: Path, at: tuple[int, int, int]) -> list[Array]:
    """The reference's three slices through voxel `at` (its first volume, scaled), float32.

    An uncompressed file is read through a memory map (only the pages the slices
    touch); a compressed one in one streamed pass (see the module's docstring).
    Errors are those of nibabel and the file system (the caller reports them).
    """
    image = nib.load(path, mmap="r")
    proxy = image.dataobj
    shape = tuple(int(n) for n in image.shape)
    padded = (*shape[:SPATIAL], 1, 1, 1)[:SPATIAL]
    if path.name.lower().endswith(".gz"):
        slices = _streamed_slices(
            path, proxy.offset, proxy.dtype, (padded[0], padded[1], padded[2]), at
        )
    else:
        data = proxy.get_unscaled()  # a memory map of the file: nothing read yet
        volume = data.reshape((*padded, -1), order="F")[..., 0] if data.ndim != SPATIAL else data
        slices = cut(lambda index: np.asarray(volume[index]), at)
    slope = 1.0 if proxy.slope is None or not np.isfinite(proxy.slope) else float(proxy.slope)
    inter = 0.0 if proxy.inter is None or not np.isfinite(proxy.inter) else float(proxy.inter)
    if slope == 1.0 and inter == 0.0:  # most scans: no scaling pass
        return [part.astype(np.float32) for part in slices]
    return [part.astype(np.float32) * np.float32(slope) + np.float32(inter) for part in slices]


def _streamed_slices(
    path: Path,
    offset: int,
    dtype: np.dtype[Any],
    shape: tuple[int, int, int],
    at: tuple[int, int, int],
) -> list[Array]:
    """The three slices of a `.nii.gz`'s first volume, read in one pass of z planes."""
    x, y, z = shape
    plane_bytes = x * y * dtype.itemsize
    planes = max(1, BLOCK_BYTES // max(1, plane_bytes))
    sagittal = np.empty((y, z), dtype=dtype)
    coronal = np.empty((x, z), dtype=dtype)
    axial = np.empty((x, y), dtype=dtype)
    with igzip.open(path, "rb") as stream:
        _skip(stream, offset)
        for start in range(0, z, planes):
            count = min(planes, z - start)
            raw = stream.read(plane_bytes * count)
            if len(raw) != plane_bytes * count:
                raise EOFError(f"{path}: expected {z} planes of voxels, found fewer")
            block = np.frombuffer(raw, dtype=dtype).reshape((x, y, count), order="F")
            sagittal[:, start : start + count] = block[at[0], :, :]
            coronal[:, start : start + count] = block[:, at[1], :]
            if start <= at[2] < start + count:
                axial[...] = block[:, :, at[2] - start]
    return [sagittal, coronal, axial]


def _skip(stream: Any, count: int) -> None:
    """Read past the header (and extensions) of a compressed file."""
    while count > 0:
        skipped = len(stream.read(min(count, BLOCK_BYTES)))
        if not skipped:
            raise EOFError("expected voxel data after the header, found the end of the file")
        count -= skipped
