"""`.npy` / `.npz` inputs for the tests of arrays, npy_header and completeness."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from niftidrop.arrays import open_input
from niftidrop.errors import ConversionError

LIMIT = 1 << 30


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes `np.save` writes for `array`."""
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def header_bytes(header: dict[str, object], version: tuple[int, int]) -> bytes:
    """A .npy header written by numpy itself, in format `version`."""
    stream = io.BytesIO()
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(stream, header)
    else:
        np.lib.format.write_array_header_2_0(stream, header)
    raw = stream.getvalue()
    # 3.0 is 2.0 with another version byte (it only differs for non-ASCII field names).
    return raw[:6] + bytes(version) + raw[8:]


def rejection(path: Path, *, npz_key: str | None = None, limit: int = LIMIT) -> ConversionError:
    """The ConversionError that opening `path` raises."""
    with pytest.raises(ConversionError) as caught:
        open_input(path, npz_key=npz_key, max_input_bytes=limit)
    return caught.value
