"""`channels = "argmax"` without NumPy's per-voxel loop: a running maximum over channels.

`np.argmax(values, axis=-1)` walks each voxel's C channels in a loop of its own,
and copies the values first when the channel axis is not the fastest in memory;
on 4 float16 channels that is about 50 ns a voxel. Here the channels are taken
one after another, each a whole block of voxels: a running maximum (kept in the
input's own width) and a running index (the narrowest integer holding C - 1) are
updated where a channel is strictly larger, so the first maximum wins on ties,
as in NumPy. Floats are compared through integer keys of the same width that
order them as NumPy's argmax does: -0.0 equals 0.0, and NaN is larger than
everything, the first NaN winning. Complex values and many channels keep NumPy's
own argmax.

`argmax_last` does one block (an output slab); `argmax_in_passes` a streamed
input whose channels come one after another in its file (channels first), in
one pass over it, holding a running maximum and index for the whole volume.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from niftidrop.arrays import InputArray

Array = npt.NDArray[Any]
Index = tuple[slice, ...]

# Above this many channels NumPy's own loop is no slower than one pass per channel.
MAX_RUNNING_CHANNELS: Final = 32
# Pieces of a channel read between two page releases, when streamed: small, as each
# takes a few temporary arrays of its size next to the volume-sized running arrays.
PIECE_BYTES: Final = 1024 * 1024


def index_dtype(channels: int) -> np.dtype[Any]:
    """The narrowest unsigned integer that holds 0 .. channels - 1."""
    for candidate in ("u1", "u2", "u4"):
        if channels - 1 <= np.iinfo(candidate).max:
            return np.dtype(candidate)
    return np.dtype("u8")


def keys(values: Array) -> Array:
    """Values NumPy's argmax compares as it compares `values`, as plain integers: a view
    for integers, booleans and floats without a sign bit or NaN, else a new array."""
    if values.dtype.kind == "b":
        return values.view(np.uint8)
    if values.dtype.kind in "iu":
        return values
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    width = values.dtype.itemsize
    signed = np.dtype(f"i{width}")
    bits = values.view(signed)
    magnitude_mask = signed.type(np.iinfo(signed).max)
    infinity = signed.type(np.array(np.inf, values.dtype).view(signed))
    if bits.size and bits.min() >= 0 and bits.max() <= infinity:
        return bits  # no sign bit, no NaN (probabilities): the bits order as the values
    key: Array = np.bitwise_and(bits, magnitude_mask)
    nan = key > infinity
    # Sign and magnitude to two's complement: -m for negative values, so -0.0 is 0.
    negative = np.right_shift(bits, width * 8 - 1)
    np.bitwise_xor(key, negative, out=key)
    np.subtract(key, negative, out=key)
    # Every NaN (either sign) is the largest key, and equal to the others.
    np.putmask(key, nan, magnitude_mask)
    return key


class RunningArgmax:
    """The channel of the largest value seen so far in each voxel, channel after channel.

    Channel 0 must be given first for every voxel, then channels in increasing order.
    """

    def __init__(self, shape_like: Array, channels: int) -> None:
        # The same memory layout as the channels, so updates walk both in step.
        self.index = np.zeros_like(shape_like, dtype=index_dtype(channels), order="K")
        self._best = np.empty_like(self.index, dtype=_key_dtype(shape_like.dtype), order="K")

    def update(self, channel: int, values: Array, where: Index | tuple[()] = ()) -> None:
        """Take `values` of `channel` for the voxels `where` (all by default)."""
        best = self._best[where]
        key = keys(values)
        if channel == 0:
            np.copyto(best, key)
            return
        better = np.greater(key, best)
        np.maximum(best, key, out=best)
        # Channels come in increasing order, so a better one has the largest index yet.
        index = self.index[where]
        np.maximum(index, np.multiply(better, channel, dtype=index.dtype), out=index)


def _key_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind == "f":
        return np.dtype(f"i{dtype.itemsize}")
    return dtype.newbyteorder("=")


def uses_running(values: Array) -> bool:
    """True when `values` (channels last) are arg-maxed here rather than by NumPy."""
    return values.dtype.kind != "c" and 1 < values.shape[-1] <= MAX_RUNNING_CHANNELS


def argmax_last(values: Array) -> Array:
    """`np.argmax(values, axis=-1)`, as the narrowest unsigned integer when done here."""
    if not uses_running(values):
        labels: Array = np.argmax(values, axis=-1)
        return labels
    running = RunningArgmax(values[..., 0], values.shape[-1])
    for channel in range(values.shape[-1]):
        running.update(channel, values[..., channel])
    return running.index


def channels_come_last_in_file(view: Array) -> bool:
    """True when the channel axis (last) of `view` has the largest stride: each channel
    lies in the file after the one before (channels first, in NumPy's words)."""
    moving = [abs(view.strides[a]) for a in range(view.ndim - 1) if view.shape[a] > 1]
    return view.shape[-1] > 1 and all(abs(view.strides[-1]) > s for s in moving)


def reads_channels_in_turn(view: Array, argmax: bool, source: InputArray) -> bool:
    """True when `view`'s labels come from `argmax_in_passes`: a streamed input whose
    channels lie one after another in its file (a slab would need all of it at once)."""
    return (
        argmax
        and source.stream is not None
        and uses_running(view)
        and channels_come_last_in_file(view)
    )


def argmax_in_passes(view: Array, source: InputArray) -> Array:
    """The labels of `view` (channels last, `uses_running`) from `source.lazy`, reading
    each channel once, front to back; one running maximum and index for the volume."""
    running = RunningArgmax(view[..., 0], view.shape[-1])
    for channel in range(view.shape[-1]):
        values = view[..., channel]
        for where in _pieces_in_file_order(values):
            piece = values[where]
            source.ensure(piece)
            running.update(channel, piece, where)
            source.release_pages()
    return running.index


def _pieces_in_file_order(values: Array) -> Iterator[Index]:
    """`values` cut along its axis that is slowest in the file, front to back."""
    moving = [(abs(values.strides[a]), a) for a in range(values.ndim) if values.shape[a] > 1]
    if not moving:
        yield (slice(None),) * values.ndim
        return
    stride, axis = max(moving)
    step = max(1, PIECE_BYTES // max(stride, 1))
    for start in range(0, values.shape[axis], step):
        yield (slice(None),) * axis + (slice(start, start + step),)
