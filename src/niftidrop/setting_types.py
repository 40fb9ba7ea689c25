"""The settings whose values need more checking than their type (README: Configuration).

Each is a type with its checks attached, so that the settings model and a profile
(which may set the same keys) check a value the same way, in one place: a library
given as one string from the environment, a 4x4 affine, a dtype name, a regular
expression with a group named key, a `host:port`, a table of label names (or the
`dataset.json` that holds one), a hook command, an http(s) URL, `preview` (which
needs Pillow). `ALLOWED` says in words what each accepts, for configuration errors.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Final

import numpy as np
from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_settings import NoDecode

from niftidrop.labels import parse_labels

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
    "labels": 'a table of values and names ({1 = "liver"}, or names to values {liver = 1}; '
    "flags, environment: JSON), or the path of an nnU-Net dataset.json",
    "profiles": "a list of tables, each with a name, a match glob and settings "
    "(flags, environment: JSON)",
    **dict.fromkeys(
        ("on_converted", "on_failed"),
        "a command as a list of strings, the program first, run without a shell "
        '(flags, environment: JSON, e.g. ["/usr/local/bin/upload", "--site", "a"])',
    ),
    "notify_url": "an http:// or https:// URL, e.g. http://127.0.0.1:8080/events",
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


def json_text(value: Any) -> Any:
    """A flag's or variable's text read as JSON (blank: None); any other value as it is."""
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


def _parse_command(value: Any) -> Any:
    # From flags and the environment: JSON. An empty value is no command.
    if isinstance(value, str):
        if not value.strip():
            return None
        if value.lstrip().startswith("["):
            return json.loads(value)
    return value


def _command_has_program(value: list[str] | None) -> list[str] | None:
    if value is not None and (not value or not value[0]):
        raise ValueError("expected a program to run (the first string)")
    return value


def _folder_name(value: str | None) -> str | None:
    """An instance's name names its folder in the state folder: one plain name."""
    if value is None:
        return None
    if not value or value in (".", "..") or value.startswith(".") or "/" in value or "\0" in value:
        raise ValueError(f"expected a name that can name a folder, found {value!r}")
    if len(value.encode()) > 200:
        raise ValueError("expected at most 200 bytes")
    return value


def _http_url(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    return value


Folders = Annotated[
    list[Path], NoDecode, BeforeValidator(_split_library), AfterValidator(_library_not_empty)
]
Affine = Annotated[
    list[list[float]] | None,
    NoDecode,
    BeforeValidator(json_text),
    AfterValidator(_affine_is_4x4),
]
DtypePolicy = Annotated[
    str, AfterValidator(_known_dtype), Field(description="auto, keep, or a NumPy dtype name")
]
KeyPattern = Annotated[str | None, AfterValidator(_pattern_has_key)]
Address = Annotated[str | None, AfterValidator(_host_port)]
# Read once, when the settings are made: a missing or bad dataset.json stops the start.
Labels = Annotated[dict[int, str] | None, NoDecode, BeforeValidator(parse_labels)]
Command = Annotated[
    list[str] | None,
    NoDecode,
    BeforeValidator(_parse_command),
    AfterValidator(_command_has_program),
]
InstanceName = Annotated[str | None, AfterValidator(_folder_name)]
HttpUrl = Annotated[str | None, AfterValidator(_http_url)]
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
