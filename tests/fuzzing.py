"""Hostile inbox files for the fuzz tests: valid `.npy` / `.npz` files, the places in
them where a parser looks (header length, header dict, zip local headers, central
directory entries, end record), and mutations of those bytes.

Shared by the unit fuzz tests (Hypothesis draws the choices) and the service-level
fuzz (a seeded `random.Random` draws them), so both push the same kinds of damage.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The reference the fuzzed inputs are converted against, and shapes that fit it.
REFERENCE_SHAPE = (4, 5, 6)
FITTING_SHAPES = [(4, 5, 6), (4, 5, 6, 2), (2, 4, 5, 6), (4, 5, 6, 1), (1, 4, 5, 6)]
OTHER_SHAPES = [(3,), (2, 3), (4, 5, 7), (), (0, 5, 6), (4, 5, 6, 1, 1, 1, 1, 2)]
DTYPES = ["|u1", "|i1", "<i2", ">i2", "<u4", "<i8", ">u8", "<f2", "<f4", ">f8", "<c8", "|b1"]

# Values that sit on the edges parsers get wrong (signed, unsigned, 16 and 32 bits).
BOUNDARY_VALUES = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFE,
    0xFFFFFFFF,
]

# Fields of the zip records: (offset from the signature, width in bytes).
_LOCAL_FIELDS = [(4, 2), (6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)]
_CENTRAL_FIELDS = [
    (4, 2),
    (6, 2),
    (8, 2),
    (10, 2),
    (16, 4),
    (20, 4),
    (24, 4),
    (28, 2),
    (30, 2),
    (32, 2),
    (34, 2),
    (42, 4),
]
_END_FIELDS = [(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)]
_SIGNATURES = {
    b"PK\x03\x04": _LOCAL_FIELDS,
    b"PK\x01\x02": _CENTRAL_FIELDS,
    b"PK\x05\x06": _END_FIELDS,
}


@dataclass(frozen=True)
class Field:
    """A little-endian integer field at `offset`, `width` bytes wide."""

    offset: int
    width: int


def npy_bytes(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, array, version=version)
    return stream.getvalue()


def npz_bytes(arrays: Sequence[np.ndarray], *, compressed: bool) -> bytes:
    stream = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(stream, "w", compression=method) as archive:
        for number, array in enumerate(arrays):
            archive.writestr(f"arr_{number}.npy", npy_bytes(array))
    return stream.getvalue()


def array_of(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """A small array with varied values (labels, scores, extremes)."""
    rng = np.random.default_rng(seed)
    wanted = np.dtype(dtype)
    values = rng.integers(0, 5, size=shape) if wanted.kind in "biu" else rng.random(shape)
    return values.astype(wanted)


def header_text(descr: str, fortran_order: object, shape: object, padding: int) -> bytes:
    """A .npy header dict written by hand (any values, not only valid ones)."""
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran_order!r}, 'shape': {shape!r}, }}"
    return (text + " " * padding + "\n").encode("latin1", "replace")


def npy_with_header(text: bytes, data: bytes, version: int = 1, length: int | None = None) -> bytes:
    """`\\x93NUMPY` + version + length field (true length unless `length`) + text + data."""
    declared = len(text) if length is None else length
    field = struct.pack("<H", declared & 0xFFFF) if version == 1 else struct.pack("<I", declared)
    return b"\x93NUMPY" + bytes((version, 0)) + field + text + data


def fields_of(content: bytes) -> list[Field]:
    """Where parsers look: the .npy length field and every field of every zip record."""
    found = []
    if content.startswith(b"\x93NUMPY"):
        found.append(Field(8, 2 if content[6:7] == b"\x01" else 4))
    for signature, layout in _SIGNATURES.items():
        start = content.find(signature)
        while start >= 0:
            found.extend(
                Field(start + offset, width)
                for offset, width in layout
                if start + offset + width <= len(content)
            )
            start = content.find(signature, start + 1)
    return found


def mutate(content: bytes, operations: Sequence[tuple[int, int, int]]) -> bytes:
    """Apply (kind, where, value) operations; `where` and `value` are taken modulo
    what fits, so any integers make a valid operation.

    Kinds: 0 flip a byte, 1 cut the file, 2 insert bytes, 3 delete bytes, 4 set a
    structural field to a boundary value, 5 nudge a structural field by +-1,
    6 set a byte.
    """
    raw = bytearray(content)
    for kind, where, value in operations:
        size = len(raw)
        at = where % (size + 1)
        match kind % 7:
            case 0 if size:
                raw[at % size] ^= 1 << (value % 8) if value % 9 else 0xFF
            case 1:
                del raw[at:]
            case 2:
                raw[at:at] = bytes([value % 256]) * (1 + value % 7)
            case 3:
                del raw[at : at + 1 + value % 64]
            case 4 | 5 as field_kind:
                fields = fields_of(bytes(raw))
                if fields:
                    _set_field(raw, fields[where % len(fields)], value, nudge=field_kind == 5)
            case 6 if size:
                raw[at % size] = value % 256
    return bytes(raw)


def _set_field(raw: bytearray, field: Field, value: int, *, nudge: bool) -> None:
    mask = (1 << (8 * field.width)) - 1
    span = slice(field.offset, field.offset + field.width)
    if nudge:
        current = int.from_bytes(raw[span], "little")
        new = (current + (1 if value % 2 else -1)) & mask
    else:
        new = BOUNDARY_VALUES[value % len(BOUNDARY_VALUES)] & mask
    raw[span] = new.to_bytes(field.width, "little")
