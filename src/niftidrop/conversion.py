"""Array + reference header -> NIfTI header and data (README: Conversion). No folders here.

`plan_conversion` decides everything up front (output shapes, dtype, headers) and
`encode_volume` then yields the output file's bytes: the header, then the voxel
data in Fortran order, slab by slab along the slowest output axis, each slab cast
(and checked) on its own. For a memory-mapped `.npy` the pages read are dropped
after each piece, so resident memory stays near one slab whatever the layout.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal

import isal.igzip
import nibabel
import numpy as np
import numpy.typing as npt

from niftidrop.arrays import InputArray
from niftidrop.errors import ConversionError, ErrorCode

# nibabel's functions carry no annotations; its objects are handled as Any here.
nib: Any = nibabel
igzip: Any = isal.igzip  # isal's functions carry no annotations either
isal_zlib: Any = isal.isal_zlib
GZIP_MAGIC = b"\x1f\x8b"
NiftiHeader = Any  # a nibabel Nifti1Header or Nifti2Header
Array = npt.NDArray[Any]

# Slabs of a few MiB keep the compressor fed without holding much in memory.
SLAB_BYTES = 4 * 1024 * 1024
# Non-sequential layouts touch the whole file once per slab, so their slabs are
# larger (an eighth of the input, capped) and copied in pieces along the input's
# slowest axis, dropping the pages after each piece.
TRANSPOSE_SLAB_FRACTION = 8
TRANSPOSE_SLAB_CAP = 1024 * 1024 * 1024
PIECE_BYTES = 4 * 1024 * 1024
SPATIAL = 3


# The reference.


@dataclass(frozen=True)
class Reference:
    """A reference image's header (little-endian) and its spatial shape.

    The header is cached and shared: it is never changed (`output_header` copies it).
    """

    path: Path
    header: NiftiHeader
    shape: tuple[int, ...]

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        padded = (*self.shape[:SPATIAL], 1, 1, 1)
        return (padded[0], padded[1], padded[2])


def read_reference(path: Path, *, input_name: str | None = None) -> Reference:
    """The reference at `path`, cached while the file is unchanged.

    Raises ConversionError BAD_REFERENCE when nibabel cannot read it as NIfTI; the
    message names `input_name` too, the input the reference was wanted for.
    """
    subject = f"{input_name}: reference {path}" if input_name else str(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ConversionError(
            ErrorCode.BAD_REFERENCE,
            f"{subject}: expected a reference NIfTI file, found nothing",
            reference=path,
        ) from None
    try:
        return _read_reference_cached(path, stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except _UNREADABLE as exc:
        raise ConversionError(
            ErrorCode.BAD_REFERENCE,
            f"{subject}: expected a readable NIfTI-1 or NIfTI-2 file, found {exc}",
            reference=path,
        ) from None
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise  # transient: the service retries it
        raise ConversionError(
            ErrorCode.BAD_REFERENCE,
            f"{subject}: expected a readable file, found an error reading it ({exc})",
            reference=path,
        ) from None


# What nibabel and the gzip reader raise for bytes that are no NIfTI file.
_UNREADABLE: Final = (
    nib.filebasedimages.ImageFileError,
    ValueError,
    TypeError,
    EOFError,
    isal_zlib.error,
)


@functools.lru_cache(maxsize=256)
def _read_reference_cached(path: Path, mtime_ns: int, size: int, inode: int) -> Reference:
    """Failures are raised as they come (lru_cache keeps no exceptions)."""
    del mtime_ns, size, inode  # only part of the cache key
    header = _read_header(path)
    shape = tuple(int(n) for n in header.get_data_shape())
    header = header.as_byteswapped("<") if header.endianness == ">" else header
    return Reference(path=path, header=header, shape=shape)


def _read_header(path: Path) -> NiftiHeader:
    """The header (and extensions) of a single-file NIfTI-1 or NIfTI-2, gzipped or not.

    The file is opened once and only its header is read (`nib.load` opens it
    twice and builds an image around it): with one reference per input, this
    runs for almost every conversion. Scaling and `vox_offset` stay as stored;
    `output_header` resets them.
    """
    with path.open("rb") as raw:
        gzipped = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream: IO[bytes] = igzip.IGzipFile(filename="", mode="rb", fileobj=raw) if gzipped else raw
        with stream:
            block = stream.read(nib.Nifti2Header.template_dtype.itemsize)
            for kind in (nib.Nifti1Header, nib.Nifti2Header):
                if kind.may_contain_header(block):
                    stream.seek(0)
                    return kind.from_fileobj(stream, check=True)
    raise TypeError("neither a NIfTI-1 nor a NIfTI-2 header")


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: Path, mtime_ns: int, size: int) -> str:
    del mtime_ns, size
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def reference_sha256(path: Path) -> str:
    """The reference's SHA-256, cached while the file is unchanged."""
    stat = path.stat()
    return _sha256_cached(path, stat.st_mtime_ns, stat.st_size)


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
    channels: Literal["keep", "argmax", "split"] = "keep",
    version: str = "",
) -> Plan:
    """Decide the outputs of `source` against `reference` (or `affine`, or identity)."""
    name = source.path.name
    ref_path = reference.path if reference else None
    arranged = arrange(
        source.data, reference.spatial_shape if reference else None, axis_order, name, ref_path
    )
    has_channels = arranged.ndim > SPATIAL
    if channels == "split" and has_channels:
        parts = [(f"_c{c}", arranged[..., c], False) for c in range(arranged.shape[-1])]
    elif channels == "split":
        parts = [("_c0", arranged, False)]
    else:
        parts = [("", arranged, channels == "argmax" and has_channels)]
    out_dtype, check = _choose_dtype(source, arranged, parts[0][2], dtype, name)
    volumes = []
    for suffix, view, argmax in parts:
        shape = view.shape[:-1] if argmax else view.shape
        header = output_header(reference, affine, shape, out_dtype, version=version, name=name)
        volumes.append(Volume(suffix, view, argmax, out_dtype, header, check))
    return Plan(volumes=tuple(volumes), dtype_in=source.dtype, shape_in=source.shape)


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
    for _, pieces in _slabs_of(view, False, source):
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

    Each chunk is valid only until the next one is asked for: one slab buffer is
    reused for the whole volume, so memory stays at one slab (the writer copies).
    """
    yield header_bytes(volume.header)
    copy_free = (
        volume.check is None
        and not volume.argmax
        and volume.source.dtype == volume.dtype
        and volume.source.dtype.kind != "b"
    )
    storage: Array | None = None
    for slab_shape, pieces in _slabs_of(volume.source, volume.argmax, source):
        count = int(np.prod(slab_shape, dtype=np.int64))
        if storage is None or storage.size < count:
            storage = np.empty(count, dtype=volume.dtype)
        buffer = storage[:count].reshape(slab_shape, order="F")
        for index, piece in pieces:
            if copy_free and index is None and piece.flags.f_contiguous:
                buffer = piece  # already the file's bytes: no copy
                break
            if volume.check is not None:
                volume.check(piece)
            # Imaginary parts of a complex -> real cast were checked to be zero.
            values = piece.real if piece.dtype.kind == "c" and volume.dtype.kind != "c" else piece
            copy_in_tiles(buffer if index is None else buffer[index], values)
        yield buffer.reshape(-1, order="F").view(np.uint8).data
        source.release_pages()


Index = tuple[slice | int, ...]
# A transposing copy is cache-friendly in tiles this long along the axes that
# are fastest in the source and in the target, and this long along a third axis.
TILE_FAST = 64
TILE_OTHER = 8


def copy_in_tiles(target: Array, values: Array) -> None:
    """`target[...] = values` (cast unchecked), in cache-sized tiles when transposing.

    `target` is Fortran-ordered. When `values` runs fastest along another axis,
    a plain copy strides through memory on one side; tiles keep both in cache.
    """
    sizes = [(abs(stride), axis) for axis, stride in enumerate(values.strides)]
    moving = [(stride, axis) for stride, axis in sizes if values.shape[axis] > 1]
    source_fast = min(moving)[1] if moving else 0
    target_fast = next((a for a in range(target.ndim) if target.shape[a] > 1), 0)
    if source_fast == target_fast or target.size <= TILE_FAST * TILE_FAST * TILE_OTHER:
        np.copyto(target, values, casting="unsafe")
        return
    others = [a for a in range(target.ndim) if a not in (source_fast, target_fast)]
    third = max(others, key=lambda a: target.shape[a]) if others else None
    steps = {source_fast: TILE_FAST, target_fast: TILE_FAST}
    if third is not None:
        steps[third] = TILE_OTHER
    ranges = [
        [slice(start, start + steps[axis]) for start in range(0, target.shape[axis], steps[axis])]
        if axis in steps
        else [slice(None)]
        for axis in range(target.ndim)
    ]
    for tile in itertools.product(*ranges):
        np.copyto(target[tile], values[tile], casting="unsafe")


def _slabs_of(
    view: Array, argmax: bool, source: InputArray
) -> Iterator[tuple[tuple[int, ...], Iterator[tuple[Index | None, Array]]]]:
    """Output slabs in Fortran order, each as (its output shape, pieces of values).

    A piece's index is None when it is the whole slab. Pages of a mapped input
    are released after every piece.
    """
    shape = view.shape[:-1] if argmax else view.shape
    per_voxel = view.dtype.itemsize * (view.shape[-1] if argmax else 1)
    sequential = _reads_sequentially(view, len(shape))
    target = SLAB_BYTES
    if source.mapping is not None and not sequential:
        share = source.data.nbytes // TRANSPOSE_SLAB_FRACTION
        target = max(SLAB_BYTES, min(TRANSPOSE_SLAB_CAP, share))
    for slab in slab_indices(shape, per_voxel, target):
        part = view[slab]
        slab_shape = part.shape[:-1] if argmax else part.shape
        if source.mapping is None or sequential:
            yield slab_shape, _whole(part, argmax)
        else:
            yield slab_shape, _pieces(part, argmax, source)


def _whole(part: Array, argmax: bool) -> Iterator[tuple[Index | None, Array]]:
    yield None, (np.argmax(part, axis=-1) if argmax else part)


def _pieces(part: Array, argmax: bool, source: InputArray) -> Iterator[tuple[Index | None, Array]]:
    """`part` cut along its axis that is slowest in the file, so pages can be dropped."""
    spatial = part.ndim - 1 if argmax else part.ndim
    sizes = [(abs(part.strides[a]), a) for a in range(spatial) if part.shape[a] > 1]
    if not sizes:
        yield from _whole(part, argmax)
        return
    stride, axis = max(sizes)
    # With argmax every step along `axis` reads each channel's stretch of the file.
    span = max(stride, 1) * (part.shape[-1] if argmax else 1)
    step = max(1, PIECE_BYTES // span)
    for start in range(0, part.shape[axis], step):
        index = (slice(None),) * axis + (slice(start, start + step),)
        values = part[index]
        yield index, (np.argmax(values, axis=-1) if argmax else values)
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
