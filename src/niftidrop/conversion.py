"""Array + reference header -> NIfTI header and data (README: Conversion). No folders here.

`plan_conversion` decides everything up front (output shapes, dtype, headers) and
`encode_volume` then yields the output file's bytes: the header, then the voxel
data in Fortran order, slab by slab along the slowest output axis, each slab cast
(and checked) on its own. For a memory-mapped `.npy` the pages read are dropped
after each piece, so resident memory stays near two slabs whatever the layout.
The reference's header comes from `niftidrop.reference`; the slabs are cut and
filled by `niftidrop.slabs`.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from niftidrop.arrays import InputArray
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.reference import SPATIAL, NiftiHeader, Reference, nib
from niftidrop.slabs import copy_in_blocks, slabs_of

Array = npt.NDArray[Any]
# What becomes of a channel axis (README: Conversion).
Channels = Literal["keep", "argmax", "split", "vector"]


# dtype policy.


def _unavoidable(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """What NIfTI cannot store as is: bool -> uint8, float16 -> float32; little-endian."""
    if dtype.kind == "b":
        return np.dtype("<u1")
    if dtype == np.float16:
        return np.dtype("<f4")
    return dtype.newbyteorder("<")


def narrowest_integer(low: int, high: int, fallback: np.dtype[Any]) -> np.dtype[Any]:
    """uint8, int16 or int32, the first that holds [low, high]; else `fallback`."""
    for candidate in ("<u1", "<i2", "<i4"):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return np.dtype(candidate)
    return fallback.newbyteorder("<")


def _value_check(
    source: np.dtype[Any], target: np.dtype[Any], name: str
) -> Callable[[Array], None] | None:
    """A check that `values` survive a cast from `source` to `target` unchanged in value."""
    if np.can_cast(source, target, casting="safe") or source.kind == "b":
        return None

    def fail(values: Array) -> None:
        finite = values[np.isfinite(values)] if values.dtype.kind in "fc" else values
        low = finite.min() if finite.size else "none"
        high = finite.max() if finite.size else "none"
        raise ConversionError(
            ErrorCode.DTYPE_OVERFLOW,
            f"{name}: expected values that fit {target.name} exactly, found values from "
            f"{low} to {high}" + (" and non-finite values" if finite.size < values.size else ""),
        )

    if target.kind == "b":
        target = np.dtype("u1")
        bounds: tuple[float, float] = (0, 1)
    elif target.kind in "iu":
        bounds = (int(np.iinfo(target).min), int(np.iinfo(target).max))
    else:
        bounds = (-float(np.finfo(target).max), float(np.finfo(target).max))

    def check(values: Array) -> None:
        if values.dtype.kind == "c":
            if target.kind != "c" and np.any(values.imag != 0):
                fail(values)
            values = np.concatenate([values.real.ravel(), values.imag.ravel()])
        if values.size == 0:
            return
        if target.kind in "iub":
            if values.dtype.kind == "f" and (
                not np.all(np.isfinite(values)) or np.any(np.trunc(values) != values)
            ):
                fail(values)
            if values.min() < bounds[0] or values.max() > bounds[1]:
                fail(values)
        else:  # float and complex targets: infinities and NaN stay what they are
            finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
            if finite.size and (finite.min() < bounds[0] or finite.max() > bounds[1]):
                fail(values)

    return check


# Shapes.


def arrange(
    data: Array,
    spatial: tuple[int, int, int] | None,
    axis_order: Literal["xyz", "zyx"],
    name: str,
    reference: Path | None = None,
) -> Array:
    """A view of `data` shaped S or S+(C,) in x, y, z order (no copy).

    Accepts S, S+(C,), (C,)+S and those with extra singleton axes (README: Conversion).
    """
    if spatial is None:
        spatial = _spatial_without_reference(data.shape, name)
        if axis_order == "zyx":
            spatial = (spatial[2], spatial[1], spatial[0])
    kept = tuple(n for n in spatial if n != 1)
    expected = kept[::-1] if axis_order == "zyx" else kept
    core = data.reshape(tuple(n for n in data.shape if n != 1))
    channels_first = False
    if core.shape == expected:
        channels = None
    elif core.ndim == len(expected) + 1 and core.shape[:-1] == expected:
        channels = core.shape[-1]
    elif core.ndim == len(expected) + 1 and core.shape[1:] == expected:
        channels, channels_first = core.shape[0], True
    else:
        raise _shape_mismatch(data.shape, spatial, axis_order, name, reference)
    if channels_first:
        core = np.moveaxis(core, 0, -1)
    if axis_order == "zyx":
        axes = list(range(len(kept)))[::-1] + ([len(kept)] if channels else [])
        core = core.transpose(axes)
    return core.reshape(spatial + ((channels,) if channels else ()))


def _shape_mismatch(
    shape: tuple[int, ...],
    spatial: tuple[int, int, int],
    axis_order: Literal["xyz", "zyx"],
    name: str,
    reference: Path | None,
) -> ConversionError:
    """SHAPE_MISMATCH showing the shape wanted in the order the array must have, with a
    hint at `axis_order` when the array's spatial axes are the wanted ones reversed."""
    wanted = spatial[::-1] if axis_order == "zyx" else spatial
    order = "z, y, x" if axis_order == "zyx" else "x, y, z"
    hint = ""
    kept = tuple(n for n in wanted if n != 1)
    core = tuple(n for n in shape if n != 1)
    if kept != kept[::-1] and kept[::-1] in (core, core[:-1], core[1:]):
        other = "xyz" if axis_order == "zyx" else "zyx"
        hint = f'; its spatial axes look reversed: set axis_order = "{other}"'
    return ConversionError(
        ErrorCode.SHAPE_MISMATCH,
        f"{name}: expected shape {wanted} in {order} order (optionally with a channel axis "
        f"first or last) to match reference {reference or 'geometry'}, found {shape}{hint}",
        reference=reference,
    )


def _spatial_without_reference(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    """Without a reference the first three axes are space and a fourth is channels."""
    if len(shape) > SPATIAL + 1 and any(n != 1 for n in shape[SPATIAL + 1 :]):
        raise ConversionError(
            ErrorCode.BAD_SHAPE,
            f"{name}: expected at most 4 dimensions without a reference, found shape {shape}",
        )
    padded = (*shape[:SPATIAL], 1, 1, 1)
    return (padded[0], padded[1], padded[2])


# Planning.


@dataclass(frozen=True)
class Volume:
    """One output file: its name suffix, header, and where its voxels come from."""

    suffix: str
    source: Array  # output-shaped view, or output shape + (C,) when `argmax`
    argmax: bool
    dtype: np.dtype[Any]
    header: NiftiHeader
    check: Callable[[Array], None] | None = field(default=None, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in (self.source.shape[:-1] if self.argmax else self.source.shape))

    @property
    def data_bytes(self) -> int:
        """The size of its voxel data in the file."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Plan:
    """Every output of one input, decided before a byte is written."""

    volumes: tuple[Volume, ...]
    dtype_in: np.dtype[Any]
    shape_in: tuple[int, ...]
    label_map: bool = False  # integer outputs of an input with label names

    @property
    def dtype_out(self) -> np.dtype[Any]:
        return self.volumes[0].dtype

    @property
    def shape_out(self) -> tuple[int, ...]:
        return self.volumes[0].shape


def plan_conversion(
    source: InputArray,
    reference: Reference | None,
    *,
    affine: Array | None = None,
    dtype: str = "auto",
    axis_order: Literal["xyz", "zyx"] = "xyz",
    channels: Channels = "keep",
    version: str = "",
    labels: bool = False,
) -> Plan:
    """Decide the outputs of `source` against `reference` (or `affine`, or identity).

    A channel axis C becomes: dimension 4 (`keep`), the index of the largest channel
    (`argmax`), one output per channel (`split`), or dimension 5 with dimension 4 of
    size 1 and intent NIFTI_INTENT_VECTOR (`vector`: one C-component image for
    ITK-based readers). An array without one gives one 3-D output for each but `split`.
    With `labels` (label names are known), integer outputs other than vectors are
    label maps: intent NIFTI_INTENT_LABEL.
    """
    name = source.path.name
    ref_path = reference.path if reference else None
    arranged = arrange(
        source.lazy, reference.spatial_shape if reference else None, axis_order, name, ref_path
    )
    has_channels = arranged.ndim > SPATIAL
    vector = channels == "vector" and has_channels
    if channels == "split" and has_channels:
        parts = [(f"_c{c}", arranged[..., c], False) for c in range(arranged.shape[-1])]
    elif channels == "split":
        parts = [("_c0", arranged, False)]
    elif vector:
        # x, y, z, 1, C: the components in dimension 5 (a view, no copy).
        parts = [("", np.expand_dims(arranged, axis=-2), False)]
    else:
        parts = [("", arranged, channels == "argmax" and has_channels)]
    out_dtype, check = _choose_dtype(source, arranged, parts[0][2], dtype, name)
    label_map = labels and not vector and out_dtype.kind in "iu"
    volumes = []
    for suffix, view, argmax in parts:
        shape = view.shape[:-1] if argmax else view.shape
        header = output_header(reference, affine, shape, out_dtype, version=version, name=name)
        if vector:
            header.set_intent("vector")
            header["pixdim"][4:6] = 1.0  # no time step, no spacing between components
        elif label_map:
            header.set_intent("label")
        volumes.append(Volume(suffix, view, argmax, out_dtype, header, check))
    return Plan(
        volumes=tuple(volumes), dtype_in=source.dtype, shape_in=source.shape, label_map=label_map
    )


def _choose_dtype(
    source: InputArray, arranged: Array, argmax: bool, policy: str, name: str
) -> tuple[np.dtype[Any], Callable[[Array], None] | None]:
    """The output dtype by the README's dtype policy, and the check an explicit cast needs."""
    values_dtype = np.dtype(np.intp) if argmax else source.dtype
    if policy not in ("auto", "keep"):
        target = np.dtype(policy)
        return _unavoidable(target), _value_check(values_dtype, target, name)
    if argmax:
        return narrowest_integer(0, arranged.shape[-1] - 1, values_dtype), None
    if policy == "auto" and values_dtype in (np.dtype("int64"), np.dtype("uint64")):
        low, high = value_range(arranged, source)
        return narrowest_integer(low, high, values_dtype), None
    return _unavoidable(values_dtype), None


def value_range(view: Array, source: InputArray) -> tuple[int, int]:
    """Smallest and largest value of `view`, read in a streamed pass."""
    low: int | None = None
    high: int | None = None
    for _, pieces in slabs_of(view, False, source):
        for _, values in pieces:
            piece_low, piece_high = int(values.min()), int(values.max())
            low = piece_low if low is None else min(low, piece_low)
            high = piece_high if high is None else max(high, piece_high)
            source.release_pages()
    if low is None or high is None:  # pragma: no cover - inputs have a voxel (checked on open)
        raise ValueError("no values")
    return low, high


def output_header(
    reference: Reference | None,
    affine: Array | None,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    *,
    version: str,
    name: str,
) -> NiftiHeader:
    """The reference's header with its geometry kept and everything else reset."""
    header: NiftiHeader
    if reference is not None:
        header = reference.header.copy()
        header.extensions.clear()
        header["magic"] = b"n+2" if isinstance(header, nib.Nifti2Header) else b"n+1"
    else:
        matrix = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise ValueError(f"expected a finite 4x4 affine, found shape {matrix.shape}")
        header = _new_image_header(matrix.tobytes()).copy()
    try:
        header.set_data_shape(shape)
        header.set_data_dtype(dtype)
    except (nib.spatialimages.HeaderDataError, ValueError) as exc:
        code = ErrorCode.BAD_SHAPE if "shape" in str(exc) else ErrorCode.UNSUPPORTED_DTYPE
        raise ConversionError(
            code, f"{name}: expected shape and dtype NIfTI can store, found {exc}"
        ) from None
    header["scl_slope"] = np.nan
    header["scl_inter"] = np.nan
    header["cal_min"] = 0
    header["cal_max"] = 0
    header.set_intent("none")
    header["descrip"] = f"niftidrop {version}".strip().encode()[:80]
    header["vox_offset"] = 0  # recomputed when written: no extensions
    return header


@functools.lru_cache(maxsize=64)
def _new_image_header(matrix: bytes) -> NiftiHeader:
    """nibabel's own header for a new image with this affine (a float64 4x4 matrix's bytes).

    Its defaults: sform "aligned", zooms from the affine. Building an image takes
    most of a millisecond, so the header is built once per affine and copied.
    """
    affine = np.frombuffer(matrix, dtype=np.float64).reshape(4, 4)
    return nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine).header


# Encoding.


def header_bytes(header: NiftiHeader) -> bytes:
    """The header as a single-file NIfTI writes it, padded up to `vox_offset`."""
    stream = io.BytesIO()
    header.write_to(stream)
    offset = int(header["vox_offset"])
    return stream.getvalue().ljust(offset, b"\0")


def encode_volume(volume: Volume, source: InputArray) -> Iterator[memoryview | bytes]:
    """The bytes of one NIfTI file: header, then Fortran-ordered voxels slab by slab.

    Each chunk stays valid until the chunk after the next one is asked for: two slab
    buffers take turns, so the writer compresses one while the other is filled, and
    memory stays at two slabs.
    """
    yield header_bytes(volume.header)
    copy_free = (
        volume.check is None
        and not volume.argmax
        and volume.source.dtype == volume.dtype
        and volume.source.dtype.kind != "b"
    )
    storages: list[Array | None] = [None, None]
    for number, (slab_shape, pieces) in enumerate(slabs_of(volume.source, volume.argmax, source)):
        count = int(np.prod(slab_shape, dtype=np.int64))
        storage = storages[number % 2]
        if storage is None or storage.size < count:
            storage = storages[number % 2] = np.empty(count, dtype=volume.dtype)
        buffer = storage[:count].reshape(slab_shape, order="F")
        for index, piece in pieces:
            if copy_free and index is None and piece.flags.f_contiguous:
                buffer = piece  # already the file's bytes: no copy
                break
            if volume.check is not None:
                volume.check(piece)
            # Imaginary parts of a complex -> real cast were checked to be zero.
            values = piece.real if piece.dtype.kind == "c" and volume.dtype.kind != "c" else piece
            copy_in_blocks(buffer if index is None else buffer[index], values)
        yield buffer.reshape(-1, order="F").view(np.uint8).data
        source.release_pages()
