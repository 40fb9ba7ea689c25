"""Reference NIfTI files: their headers, read once and cached, and their hashes.

A reference is read for almost every conversion, so only its header is read
(`_read_header`), and the result is cached while the file is unchanged (path,
mtime, size and inode are the cache key). `niftidrop.conversion` builds each
output's header from it; the provenance sidecar records its SHA-256.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import isal.igzip
import nibabel

from niftidrop.errors import ConversionError, ErrorCode

# nibabel's functions carry no annotations; its objects are handled as Any here.
nib: Any = nibabel
igzip: Any = isal.igzip  # isal's functions carry no annotations either
isal_zlib: Any = isal.isal_zlib
GZIP_MAGIC = b"\x1f\x8b"
NiftiHeader = Any  # a nibabel Nifti1Header or Nifti2Header
SPATIAL = 3  # x, y, z: the axes a reference's geometry describes


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
