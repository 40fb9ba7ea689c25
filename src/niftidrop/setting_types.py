"""The settings whose values need more checking than their type (README: Configuration).

Each is a type with its checks attached, so that the settings model and a profile
(which may set the same keys) check a value the same way, in one place: a library
given as one string from the environment, a 4x4 affine, a dtype name, a regular
expression with a group named key, a `host:port`, `preview` (which needs Pillow).
`ALLOWED` says in words what each accepts, for configuration errors.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Final

import numpy as np
from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_settings import NoDecode

_ADDRESS: Final = "host:port with a port from 1 to 65535, e.g. 127.0.0.1:9464"
# What the settings whose validators check more than their type accept, in words
# (the others are described from their type and range: `config_sources.allowed`).
ALLOWED: Final = {
    "library": "one or more folders (in the environment: a JSON list, or paths separated "
    f"by {os.pathsep!r})",
    "default_affine": "a 4x4 matrix of finite numbers (flags, environment: JSON)",
    "dtype": "auto, keep, or a numeric NumPy dtype name (uint8, float32...)",
    "key_pattern": "a regular expression with a group named key, (?P<key>...)",
    "metrics_address": _ADDRESS,
    "preview": "true or false; true needs Pillow (pip install 'niftidrop[preview]')",
}


def _split_library(value: Any) -> Any:
    # From the environment: a JSON list, or paths separated by os.pathsep.
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [part for part in value.split(os.pathsep) if part]
    if isinstance(value, Path):
        return [value]
    return value


def _library_not_empty(value: list[Path]) -> list[Path]:
    if not value:
        raise ValueError("expected at least one folder")
    return value


def _parse_affine(value: Any) -> Any:
    if isinstance(value, str):
        return json.loads(value) if value.strip() else None
    return value


def _affine_is_4x4(value: list[list[float]] | None) -> list[list[float]] | None:
    if value is not None:
        matrix = np.asarray(value, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"its shape is {matrix.shape}")
        if not np.all(np.isfinite(matrix)):
            raise ValueError("it holds values that are not finite")
    return value


def _known_dtype(value: str) -> str:
    if value in ("auto", "keep"):
        return value
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise ValueError("not a NumPy dtype name") from None
    if dtype.kind not in "biufc":
        raise ValueError(f"{dtype} is not numeric")
    if dtype.itemsize > 16:
        raise ValueError(f"{dtype} is wider than 16 bytes")
    return dtype.name


def _pattern_has_key(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        pattern = re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    if "key" not in pattern.groupindex:
        raise ValueError("it has no group named key")
    return value


def _pillow_installed(value: bool) -> bool:
    # Checked once, at start: a missing extra would otherwise fail every input's preview.
    if value:
        try:
            from PIL import Image, ImageDraw, ImageFont  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"Pillow is not installed: {exc}") from None
    return value


def _host_port(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    try:
        parse_address(value, lowest_port=1)  # port 0 would pick one nobody knows
    except ValueError:
        raise ValueError(f"expected {_ADDRESS}") from None
    return value


Folders = Annotated[
    list[Path], NoDecode, BeforeValidator(_split_library), AfterValidator(_library_not_empty)
]
Affine = Annotated[
    list[list[float]] | None,
    NoDecode,
    BeforeValidator(_parse_affine),
    AfterValidator(_affine_is_4x4),
]
DtypePolicy = Annotated[
    str, AfterValidator(_known_dtype), Field(description="auto, keep, or a NumPy dtype name")
]
KeyPattern = Annotated[str | None, AfterValidator(_pattern_has_key)]
Address = Annotated[str | None, AfterValidator(_host_port)]
PreviewSwitch = Annotated[bool, AfterValidator(_pillow_installed)]


def parse_address(address: str, *, lowest_port: int = 0) -> tuple[str, int]:
    """`"host:port"` (IPv6 hosts in brackets, `[::1]:9464`) as `(host, port)`; a port
    below `lowest_port` (0: any free port) is refused as a ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not lowest_port <= int(port) < 65536:
        raise ValueError(f"expected host:port, found {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
