"""Walking an output volume in Fortran-order slabs, and copying values into them.

The output file wants voxels in Fortran order; the input may lie in any order
(C, Fortran, reversed axes, channels last). `slab_indices` cuts the output
into consecutive slabs of a few MiB, `slabs_of` gives each slab's values (in
pieces along the input's slowest axis for a mapped `.npy` or a streamed `.npz`
member read out of order, so its pages can be dropped; `niftidrop.argmax` for
labels), and `copy_in_blocks` copies them cache-friendly, through small blocks.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from niftidrop.argmax import argmax_in_passes, argmax_last, reads_channels_in_turn
from niftidrop.arrays import InputArray

Array = npt.NDArray[Any]

# Slabs of a few MiB keep the compressor fed without holding much in memory.
SLAB_BYTES = 4 * 1024 * 1024
# Non-sequential layouts touch the whole file once per slab, so their slabs are
# larger (an eighth of the input, capped) and copied in pieces along the input's
# slowest axis, dropping the pages after each piece.
TRANSPOSE_SLAB_FRACTION = 8
TRANSPOSE_SLAB_CAP = 1024 * 1024 * 1024
PIECE_BYTES = 4 * 1024 * 1024
# A streamed `.npz` member is decompressed again for each such slab: fewer, larger ones,
# and smaller pieces, as its two slabs take more of the memory the pieces share.
STREAM_SLAB_FRACTION = 6
STREAM_PIECE_BYTES = 2 * 1024 * 1024

Index = tuple[slice | int, ...]
# A transposing copy goes through blocks of at most this many bytes, which stay in
# the CPU's cache (see `copy_in_blocks`).
BLOCK_BYTES = 256 * 1024
# Below this many values a plain copy is as fast.
PLAIN_COPY_VALUES = 4096
_blocks = threading.local()  # each thread's block buffer


def copy_in_blocks(target: Array, values: Array) -> None:
    """`target[...] = values` (cast unchecked), through cache-sized blocks when transposing.

    `target` is Fortran-ordered. When `values` runs fastest along another axis,
    a plain copy reads it with a stride of many KiB on every value: a page, and a
    cache line, for each. So each block of `values` is first copied into a buffer
    laid out as `values` is, except that the target's fastest axis comes second
    fastest (a copy in runs along the source's fastest axis), and then from the
    buffer into `target`, whose reads now stride over a few hundred bytes of
    cache. NumPy's copy walks in the target's order either way; for arrays in
    memory this is 2-4x faster than tiles of a plain copy, label maps and
    probabilities alike (for a mapped file read in pieces, page faults weigh more).
    """
    moving = [(abs(values.strides[a]), a) for a in range(values.ndim) if values.shape[a] > 1]
    source_fast = min(moving)[1] if moving else 0
    target_fast = next((a for a in range(target.ndim) if target.shape[a] > 1), 0)
    if source_fast == target_fast or target.size <= PLAIN_COPY_VALUES:
        np.copyto(target, values, casting="unsafe")
        return
    # The buffer's axes, slowest first: the source's order, the target's fastest
    # moved next to the source's fastest.
    slowest_first = sorted(range(values.ndim), key=lambda a: -abs(values.strides[a]))
    order = [a for a in slowest_first if a not in (source_fast, target_fast)]
    order += [target_fast, source_fast]
    steps = _block_steps(values.shape, order, values.itemsize)
    ranges = [
        [slice(start, start + steps[axis]) for start in range(0, values.shape[axis], steps[axis])]
        for axis in range(values.ndim)
    ]
    buffer = _block_buffer(math.prod(steps) * values.itemsize)
    back = sorted(range(values.ndim), key=order.__getitem__)  # the buffer's axes to values'
    for block in itertools.product(*ranges):
        part = values[block]
        compact = buffer[: part.nbytes].view(part.dtype).reshape([part.shape[a] for a in order])
        staged = compact.transpose(back)
        np.copyto(staged, part)
        np.copyto(target[block], staged, casting="unsafe")


def _block_steps(shape: tuple[int, ...], order: list[int], itemsize: int) -> list[int]:
    """A block's length along each axis: whole axes from the fastest in `order` on
    while they fit in BLOCK_BYTES, then part of the next, then 1."""
    steps = [1] * len(shape)
    size = itemsize
    for axis in reversed(order):
        steps[axis] = max(1, min(shape[axis], BLOCK_BYTES // size))
        size *= steps[axis]
        if steps[axis] < shape[axis]:
            break
    return steps


def _block_buffer(size: int) -> Array:
    """This thread's buffer for blocks of `size` bytes (`copy_in_blocks`), kept."""
    buffer: Array | None = getattr(_blocks, "buffer", None)
    if buffer is None or buffer.nbytes < size:
        buffer = _blocks.buffer = np.empty(size, np.uint8)
    return buffer


def slabs_of(
    view: Array, argmax: bool, source: InputArray
) -> Iterator[tuple[tuple[int, ...], Iterator[tuple[Index | None, Array]]]]:
    """Output slabs in Fortran order, each as (its output shape, pieces of values).

    A piece's index is None when it is the whole slab. Pages of a mapped input
    are released after every piece.
    """
    if reads_channels_in_turn(view, argmax, source):
        labels = argmax_in_passes(view, source)  # in memory: one pass over the stream
        for slab in slab_indices(labels.shape, labels.itemsize, SLAB_BYTES):
            yield labels[slab].shape, iter([(None, labels[slab])])
        return
    shape = view.shape[:-1] if argmax else view.shape
    per_voxel = view.dtype.itemsize * (view.shape[-1] if argmax else 1)
    sequential = _reads_sequentially(view, len(shape))
    target = SLAB_BYTES
    if source.paged and not sequential:
        fraction = STREAM_SLAB_FRACTION if source.stream else TRANSPOSE_SLAB_FRACTION
        share = source.lazy.nbytes // fraction
        target = max(SLAB_BYTES, min(TRANSPOSE_SLAB_CAP, share))
    for slab in slab_indices(shape, per_voxel, target):
        part = view[slab]
        slab_shape = part.shape[:-1] if argmax else part.shape
        if not source.paged or sequential:
            yield slab_shape, _whole(part, argmax, source)
        else:
            yield slab_shape, _pieces(part, argmax, source)


def _whole(part: Array, argmax: bool, source: InputArray) -> Iterator[tuple[Index | None, Array]]:
    source.ensure(part)
    yield None, (argmax_last(part) if argmax else part)


def _pieces(part: Array, argmax: bool, source: InputArray) -> Iterator[tuple[Index | None, Array]]:
    """`part` cut along its axis that is slowest in the file, so pages can be dropped."""
    spatial = part.ndim - 1 if argmax else part.ndim
    sizes = [(abs(part.strides[a]), a) for a in range(spatial) if part.shape[a] > 1]
    if not sizes:
        yield from _whole(part, argmax, source)
        return
    stride, axis = max(sizes)
    # With argmax every step along `axis` reads each channel's stretch of the file.
    span = max(stride, 1) * (part.shape[-1] if argmax else 1)
    step = max(1, (STREAM_PIECE_BYTES if source.stream else PIECE_BYTES) // span)
    for start in range(0, part.shape[axis], step):
        index = (slice(None),) * axis + (slice(start, start + step),)
        values = part[index]
        source.ensure(values)
        yield index, (argmax_last(values) if argmax else values)
        source.release_pages()


def _reads_sequentially(view: Array, spatial_axes: int) -> bool:
    """True when the output's Fortran order walks the file forwards (F-like strides)."""
    strides = [view.strides[a] for a in range(spatial_axes) if view.shape[a] > 1]
    return all(0 < a < b for a, b in itertools.pairwise(strides))


def slab_indices(shape: tuple[int, ...], itemsize: int, target: int) -> Iterator[Index]:
    """Indices of consecutive Fortran-order slabs of about `target` bytes.

    Leading axes are taken whole while they fit; the next axis is cut into runs;
    the remaining (slower) axes are iterated one index at a time.
    """
    inner, split = itemsize, 0
    while split < len(shape) and inner * shape[split] <= target:
        inner *= shape[split]
        split += 1
    if split == len(shape):
        yield (slice(None),) * len(shape)
        return
    step = max(1, target // inner)
    head: Index = (slice(None),) * split
    # np.ndindex counts like C order; reversed axes make the first one fastest (F order).
    for reversed_outer in np.ndindex(*shape[split + 1 :][::-1]):
        outer = reversed_outer[::-1]
        for start in range(0, shape[split], step):
            yield (*head, slice(start, min(start + step, shape[split])), *outer)
