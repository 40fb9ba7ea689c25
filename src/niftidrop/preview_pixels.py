"""The pixel work of a QC preview (README: Conversion, Preview), done cheaply and
exactly: which voxels a nearest-neighbour resize shows, the grey window's
percentiles, and the PNG file.

`nearest` picks the voxels Pillow's `resize(..., NEAREST)` would pick, reading
only those (or whole runs along a slice's near axis), so a slice across a file's
fastest axis is not read voxel by voxel in full; `sorted_percentiles` gives
`np.percentile`'s numbers from sorted values, skipping numpy's selection;
`png_bytes` writes unfiltered rows deflated by ISA-L. `niftidrop.preview` draws
the picture with them.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Final

import isal.isal_zlib
import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
isal_zlib: Any = isal.isal_zlib  # ISA-L ships without type hints

CACHE_LINE: Final = 64  # bytes: voxels further apart than this are read one by one


def png_bytes(rgb: Array) -> bytes:
    """An RGB image (rows x columns x 3, uint8) as a PNG file.

    Written here rather than by Pillow: rows unfiltered and deflated by ISA-L at
    level 1 make a file as small as Pillow's fastest in about a twentieth of the
    time (its adaptive row filters cost more than the picture is worth here).
    """
    height, width = rgb.shape[:2]
    rows = np.empty((height, width * 3 + 1), dtype=np.uint8)
    rows[:, 0] = 0  # filter type None
    rows[:, 1:] = rgb.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", isal_zlib.compress(rows.tobytes(), 1)),
            _png_chunk(b"IEND", b""),
        ]
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def sorted_percentiles(ordered: Array, percents: tuple[float, float]) -> tuple[float, float]:
    """`np.percentile(values, percents)` (its default, linear method) of `ordered`, the
    values sorted: the same numbers, bit for bit, without numpy's selection, which
    costs several times the (vectorised) sort."""
    virtual = (ordered.size - 1) * (np.asarray(percents, dtype=np.float64) / 100)
    below = np.minimum(np.floor(virtual).astype(np.intp), ordered.size - 1)
    above = np.minimum(below + 1, ordered.size - 1)
    weight = virtual - below
    start, end = ordered[below], ordered[above]
    # numpy's interpolation, from the nearer end (so a weight of 1 gives `end` exactly).
    step = end - start
    found = start + step * weight
    np.subtract(end, step * (1 - weight), out=found, where=weight >= 0.5)
    return (float(found[0]), float(found[1]))


def nearest_indices(count: int, size: int) -> Array:
    """Which of `count` source pixels each of `size` pixels shows, resampled to nearest
    neighbours exactly as Pillow's `resize(..., NEAREST)` picks them: the centre of
    each output pixel, stepped in doubles as Pillow steps it, truncated."""
    scale = count / size
    steps = np.full(size, scale)
    steps[0] = scale * 0.5
    centres = np.cumsum(steps)  # a running sum, as Pillow adds the step pixel by pixel
    picked: Array = np.minimum(centres.astype(np.intp), count - 1)
    return picked


def nearest(values: Array, size: tuple[int, int]) -> Array:
    """`values` (rows x columns) resampled to `size` (width, height) by nearest neighbours."""
    rows = nearest_indices(values.shape[0], size[1])
    cols = nearest_indices(values.shape[1], size[0])
    near, far = sorted((0, 1), key=lambda axis: abs(values.strides[axis]))
    if abs(values.strides[near]) >= CACHE_LINE:
        # Every voxel in a cache line of its own (a slice across a file's fastest
        # axis): read only the pixels shown.
        picked: Array = values[rows[:, None], cols[None, :]]
        return picked
    # Whole runs along the near axis are read in passing: take along the far one first.
    first, second = (rows, cols) if far == 0 else (cols, rows)
    taken: Array = np.take(np.take(values, first, axis=far), second, axis=near)
    return taken
