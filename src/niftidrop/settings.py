"""The one settings model (README: Configuration): defaults < TOML file < environment < flags."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from niftidrop.config_sources import (
    ENV_PREFIX,
    Sources,
    find_config_file,
    reading_toml,
    toml_file_being_read,
)
from niftidrop.errors import ConfigError
from niftidrop.resources import available_cpus, available_memory

DtypePolicy = Annotated[str, Field(description="auto, keep, or a NumPy dtype name")]
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
}


# What one worker costs besides its conversions: its conversion process, idle
# (an interpreter with NumPy, nibabel and ISA-L loaded: about 55 MB resident).
WORKER_FOOTPRINT_BYTES = 64 * 1024**2


def _default_workers() -> int:
    # One per CPU this process may use (affinity, cgroup quota), and never more
    # than the memory holds (see `_workers_fit_in_memory`).
    return min(available_cpus(), _most_workers(available_memory()))


def _most_workers(memory: int) -> int:
    """The most workers `memory` bytes hold, each with its conversion process."""
    return max(1, memory // WORKER_FOOTPRINT_BYTES)


def _default_max_memory() -> int:
    return available_memory() // 4


class _Resolved:
    """A folder setting made absolute against `root` (`Settings.resolve`), read-only."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __repr__(self) -> str:
        return f"_Resolved({self.field!r})"

    def __get__(self, settings: Settings, owner: type[Settings] | None = None) -> Path:
        return settings.resolve(getattr(settings, self.field))


class Settings(BaseSettings):
    """Every knob of niftidrop. The CLI, environment and TOML file only fill it.

    `Settings(...)` also reads `NIFTIDROP_*` variables; `Settings.from_values(...)` does not.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        frozen=True,
    )

    # Folders (README: File protocol). Relative paths are resolved against `root`.
    root: Path = Field(default=Path(), description="base of relative folder paths")
    inbox: Path = Field(default=Path("inbox"), description="where producers drop inputs")
    outbox: Path = Field(default=Path("outbox"), description="where NIfTI outputs appear")
    archive: Path = Field(default=Path("archive"), description="converted inputs")
    failed: Path = Field(default=Path("failed"), description="rejected inputs + .error.json")
    library: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path("library")],
        description="reference NIfTI folders, searched recursively",
    )
    state_dir: Path | None = Field(default=None, description="work files; <inbox>/.niftidrop")

    # The file protocol (README: File protocol).
    settle_seconds: float = Field(default=1.0, ge=0, description="quiet time before a read")
    incomplete_timeout: float = Field(default=600.0, gt=0, description="then: truncated")
    fsync: bool = Field(default=True, description="fsync outputs and folders")
    after_success: Literal["archive", "delete"] = Field(default="archive")
    recursive: bool = Field(default=True, description="watch inbox subfolders")
    rescan_interval: float = Field(default=30.0, gt=0, description="full inbox rescan period")
    observer: Literal["auto", "inotify", "polling"] = Field(default="auto")
    poll_interval: float = Field(default=1.0, gt=0, description="polling observer period")

    # Reference matching (README: Reference matching).
    separators: str = Field(default="_-.", min_length=1, description="key token separators")
    key_pattern: str | None = Field(default=None, description="regex with a group named key")
    reference_wait: float = Field(default=0.0, ge=0, description="wait for a late reference")
    missing_reference: Literal["fail", "identity"] = Field(default="fail")
    default_affine: Annotated[list[list[float]] | None, NoDecode] = Field(
        default=None, description="4x4 affine used by missing_reference=identity"
    )

    # Conversion (README: Conversion).
    npz_key: str | None = Field(default=None, description=".npz member to convert")
    compress: bool = Field(default=True, description="write .nii.gz (else .nii)")
    on_conflict: Literal["overwrite", "rename", "fail"] = Field(default="overwrite")
    dtype: DtypePolicy = Field(default="auto")
    axis_order: Literal["xyz", "zyx"] = Field(default="xyz")
    channels: Literal["keep", "argmax", "split", "vector"] = Field(default="keep")
    max_input_bytes: int = Field(default=16 * 1024**3, gt=0)
    compression_level: int = Field(default=1, ge=0, le=3, description="igzip level 0-3")
    compression_threads: int = Field(default=0, ge=0, description="0: one per CPU")
    sidecar: bool = Field(default=False, description="write <stem>.json provenance")

    # Service (README: Configuration, Logs).
    workers: int = Field(default_factory=_default_workers, ge=1)
    shutdown_timeout: float = Field(default=30.0, ge=0)
    log_format: Literal["auto", "json", "console"] = Field(default="auto")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info")
    heartbeat_interval: float = Field(default=5.0, gt=0)
    metrics_address: str | None = Field(default=None, description="host:port for /metrics")
    max_attempts: int = Field(
        default=3, ge=1, description="tries of a conversion that crashes, then conversion_crashed"
    )
    max_memory: int = Field(
        default_factory=_default_max_memory,
        gt=0,
        description="bytes each conversion process may allocate (default: 1/4 of the memory)",
    )
    conversion_timeout: float = Field(
        default=600.0, gt=0, description="seconds one conversion may take (then: a crash)"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = toml_file_being_read()
        if toml_file is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file))

    @classmethod
    def from_values(cls, **values: Any) -> Settings:
        """`values` and the defaults, validated; no environment variable or file is read."""
        settings = cls.__new__(cls)
        BaseModel.__init__(settings, **values)  # what BaseSettings.__init__ ends with
        return settings

    @field_validator("library", mode="before")
    @classmethod
    def _split_library(cls, value: Any) -> Any:
        # From the environment: a JSON list, or paths separated by os.pathsep.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part for part in value.split(os.pathsep) if part]
        if isinstance(value, Path):
            return [value]
        return value

    @field_validator("library")
    @classmethod
    def _library_not_empty(cls, value: list[Path]) -> list[Path]:
        if not value:
            raise ValueError("expected at least one folder")
        return value

    @field_validator("default_affine", mode="before")
    @classmethod
    def _parse_affine(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else None
        return value

    @field_validator("default_affine")
    @classmethod
    def _affine_is_4x4(cls, value: list[list[float]] | None) -> list[list[float]] | None:
        if value is not None:
            matrix = np.asarray(value, dtype=np.float64)
            if matrix.shape != (4, 4):
                raise ValueError(f"its shape is {matrix.shape}")
            if not np.all(np.isfinite(matrix)):
                raise ValueError("it holds values that are not finite")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
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

    @field_validator("workers")
    @classmethod
    def _workers_fit_in_memory(cls, value: int) -> int:
        # Each worker keeps a conversion process: more than the memory holds would
        # have the OOM killer end them at random instead of converting anything.
        memory = available_memory()
        most = _most_workers(memory)
        if value > most:
            raise ValueError(
                f"expected at most {most} (each worker keeps a conversion process of about "
                f"{WORKER_FOOTPRINT_BYTES // 1024**2} MiB and niftidrop may use "
                f"{memory / 1024**3:.1f} GiB of memory)"
            )
        return value

    @field_validator("key_pattern")
    @classmethod
    def _pattern_has_key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if "key" not in pattern.groupindex:
            raise ValueError("it has no group named key")
        return value

    @field_validator("metrics_address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        try:
            parse_address(value, lowest_port=1)  # port 0 would pick one nobody knows
        except ValueError:
            raise ValueError(f"expected {_ADDRESS}") from None
        return value

    # Resolved folders.

    def resolve(self, path: Path) -> Path:
        """`path` made absolute against `root` (user `~` expanded)."""
        path = path.expanduser()
        return path if path.is_absolute() else (self.root.expanduser().absolute() / path)

    inbox_dir: ClassVar[_Resolved] = _Resolved("inbox")
    outbox_dir: ClassVar[_Resolved] = _Resolved("outbox")
    archive_dir: ClassVar[_Resolved] = _Resolved("archive")
    failed_dir: ClassVar[_Resolved] = _Resolved("failed")

    @property
    def library_dirs(self) -> list[Path]:
        return [self.resolve(folder) for folder in self.library]

    @property
    def state_path(self) -> Path:
        if self.state_dir is None:
            return self.inbox_dir / ".niftidrop"
        return self.resolve(self.state_dir)

    def folder_overlaps(self) -> list[str]:
        """Every pair of folders that lie one inside the other where niftidrop would
        feed on its own files (an archive inside the inbox converts its inputs again
        and again; a library holding the outbox takes outputs for references).

        Folders are compared as real paths (symlinks resolved). A folder may lie in
        a hidden folder (a name starting with ".") of another: niftidrop never
        enters, indexes or writes hidden folders there, which is why the default
        state folder, `<inbox>/.niftidrop`, is fine. Anything inside a non-recursive
        inbox's subfolders is out of its sight too. The state folder holds nothing
        but niftidrop's work files. Library folders may overlap each other.
        """
        folders = [
            ("inbox", self.inbox_dir),
            ("outbox", self.outbox_dir),
            ("archive", self.archive_dir),
            ("failed", self.failed_dir),
            ("state_dir", self.state_path),
            *(("library", folder) for folder in self.library_dirs),
        ]
        placed = [_Placed(name, path, Path(os.path.realpath(path))) for name, path in folders]
        return _overlaps(placed, self.recursive)

    def check_folders(self) -> None:
        """Raise ConfigError naming every overlap of `folder_overlaps`."""
        problems = self.folder_overlaps()
        if problems:
            raise ConfigError("overlapping folders: " + "; ".join(problems))

    @property
    def threads(self) -> int:
        """Compression threads: `compression_threads`, or one per CPU this process may
        use (its affinity and cgroup CPU quota, `resources.available_cpus`)."""
        return self.compression_threads or available_cpus()

    def for_service(self) -> Settings:
        """These settings as `run` uses them (and `check` prints them): with
        `compression_threads` 0, the service's workers share the CPUs."""
        if self.compression_threads:
            return self
        # Workers already keep every CPU busy on a backlog, and starting a thread
        # pool per file costs more than it saves on small outputs: share the CPUs.
        per_worker = max(1, available_cpus() // self.workers)
        return self.model_copy(update={"compression_threads": per_worker})


class _Placed(NamedTuple):
    """A folder setting: its name, its path as configured, and its real path."""

    name: str
    path: Path
    real: Path

    def __str__(self) -> str:
        shown = f"{self.name} {str(self.path)!r}"
        return shown if self.real == self.path else f"{shown} (really {str(self.real)!r})"


# Why a folder may not lie inside each kind of folder.
_WHY_NOT_INSIDE: Final = {
    "inbox": "files niftidrop puts there would be taken for new inputs",
    "outbox": "niftidrop writes outputs there under the inputs' relative paths",
    "archive": "niftidrop moves converted inputs there under their relative paths",
    "failed": "niftidrop moves rejected inputs there under their relative paths",
    "library": "every NIfTI file below it is indexed as a reference",
    "state_dir": "it holds niftidrop's own work files and nothing else",
}


def _overlaps(placed: list[_Placed], recursive: bool) -> list[str]:
    """Each pair of `placed` folders (library folders aside) that overlap, in words."""
    problems = []
    for number, first in enumerate(placed):
        for second in placed[number + 1 :]:
            if first.name == second.name == "library":
                continue
            problem = _overlap(first, second, recursive) or _overlap(second, first, recursive)
            if problem is not None:
                problems.append(problem)
    return problems


def _overlap(inner: _Placed, outer: _Placed, recursive: bool) -> str | None:
    """Why `inner` may not lie where it does relative to `outer`; None if it may."""
    if inner.real == outer.real:
        return f"{inner} and {outer} are the same folder: each needs a folder of its own"
    if not inner.real.is_relative_to(outer.real):
        return None
    hidden = any(part.startswith(".") for part in inner.real.relative_to(outer.real).parts)
    if outer.name == "state_dir":
        return f"{inner} is inside {outer}: {_WHY_NOT_INSIDE[outer.name]}; move it out"
    if hidden or (outer.name == "inbox" and not recursive):
        return None
    return (
        f"{inner} is inside {outer}: {_WHY_NOT_INSIDE[outer.name]}; move it out, "
        f"or into a hidden folder there (a name starting with '.')"
    )


def parse_address(address: str, *, lowest_port: int = 0) -> tuple[str, int]:
    """`"host:port"` (IPv6 hosts in brackets, `[::1]:9464`) as `(host, port)`; a port
    below `lowest_port` (0: any free port) is refused as a ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not lowest_port <= int(port) < 65536:
        raise ValueError(f"expected host:port, found {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from every source; `overrides` are command-line values.

    Raises `ConfigError` with one line per problem: where the value came from (the
    flag, the `NIFTIDROP_*` variable, or the TOML file and key), what is allowed and
    what was found; a TOML key or a `NIFTIDROP_*` variable that names no setting is
    one too, with the closest setting suggested.
    """
    config_file = find_config_file(config)
    sources = Sources(overrides, os.environ, config_file)
    problems = sources.unknown_variables(Settings.model_fields)
    try:
        with reading_toml(config_file):
            settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(*problems, *sources.explain(Settings, exc, ALLOWED)) from None
    except (ValueError, OSError) as exc:  # what pydantic-settings could not decode
        where = str(config_file) if config_file else "settings"
        raise ConfigError(*problems, f"{where}: {exc}") from None
    if problems:
        raise ConfigError(*problems)
    return settings
