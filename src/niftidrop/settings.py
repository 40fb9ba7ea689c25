"""The one settings model (README: Configuration): defaults < TOML file < environment < flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from niftidrop import folders
from niftidrop.config_sources import (
    ENV_PREFIX,
    Sources,
    find_config_file,
    reading_toml,
    toml_file_being_read,
)
from niftidrop.errors import ConfigError
from niftidrop.profile_rules import ProfileTable, names_once, profile_table
from niftidrop.resources import available_cpus, available_memory
from niftidrop.setting_types import (
    ALLOWED,
    Address,
    Affine,
    Command,
    DtypePolicy,
    Folders,
    HttpUrl,
    InstanceName,
    KeyPattern,
    Labels,
    PreviewSwitch,
    json_text,
    parse_address,
)

if TYPE_CHECKING:
    Profile = ProfileTable  # made from the settings' fields below the model

# Importable from here as before: the CLI and metrics use them with the settings.
__all__ = ["ALLOWED", "Settings", "load_settings", "parse_address"]

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


def _workers_fit_in_memory(value: int) -> int:
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


Workers = Annotated[int, AfterValidator(_workers_fit_in_memory)]


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
    library: Folders = Field(
        default_factory=lambda: [Path("library")],
        description="reference NIfTI folders, searched recursively",
    )
    state_dir: Path | None = Field(default=None, description="work files; <inbox>/.niftidrop")

    # The file protocol (README: File protocol).
    settle_seconds: float = Field(default=1.0, ge=0, description="quiet time before a read")
    incomplete_timeout: float = Field(default=600.0, gt=0, description="then: truncated")
    fsync: bool = Field(default=True, description="fsync outputs and folders")
    after_success: Literal["archive", "delete"] = Field(
        default="archive", description="what becomes of a converted input"
    )
    recursive: bool = Field(default=True, description="watch inbox subfolders")
    rescan_interval: float = Field(default=30.0, gt=0, description="full inbox rescan period")
    observer: Literal["auto", "inotify", "polling"] = Field(
        default="auto", description="how the inbox is watched (auto: polls network, FUSE)"
    )
    poll_interval: float = Field(default=1.0, gt=0, description="polling observer period")

    # Reference matching (README: Reference matching).
    separators: str = Field(default="_-.", min_length=1, description="key token separators")
    key_pattern: KeyPattern = Field(default=None, description="regex with a group named key")
    reference_wait: float = Field(default=0.0, ge=0, description="wait for a late reference")
    missing_reference: Literal["fail", "identity"] = Field(
        default="fail", description="when no reference is found"
    )
    default_affine: Affine = Field(
        default=None, description="4x4 affine used by missing_reference=identity"
    )

    # Conversion (README: Conversion).
    npz_key: str | None = Field(default=None, description=".npz member to convert")
    compress: bool = Field(default=True, description="write .nii.gz (else .nii)")
    on_conflict: Literal["overwrite", "rename", "fail"] = Field(
        default="overwrite", description="when an output name is taken"
    )
    dtype: DtypePolicy = Field(default="auto")
    axis_order: Literal["xyz", "zyx"] = Field(
        default="xyz", description="zyx: arrays from SimpleITK, nnU-Net"
    )
    channels: Literal["keep", "argmax", "split", "vector"] = Field(
        default="keep", description="what a channel axis becomes"
    )
    max_input_bytes: int = Field(
        default=16 * 1024**3, gt=0, description="larger arrays fail as too_large"
    )
    compression_level: int = Field(default=1, ge=0, le=3, description="igzip level 0-3")
    compression_threads: int = Field(default=0, ge=0, description="0: one per CPU")
    sidecar: bool = Field(default=False, description="write <stem>.json provenance")
    labels: Labels = Field(
        default=None, description="label names: a table, or an nnU-Net dataset.json"
    )
    preview: PreviewSwitch = Field(
        default=False, description="write <stem>.png, a QC picture (needs niftidrop[preview])"
    )

    # Service (README: Configuration, Logs).
    workers: Workers = Field(
        default_factory=_default_workers, ge=1, description="inputs converted at once"
    )
    shutdown_timeout: float = Field(
        default=30.0, ge=0, description="a stop waits for conversions in flight"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a terminal, else JSON"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="the lowest level logged"
    )
    heartbeat_interval: float = Field(
        default=5.0, gt=0, description="health wants one within 3 intervals"
    )
    # Many instances, one spool (README: Many instances, one spool).
    instance: InstanceName = Field(
        default=None, description="this instance's name, unique among live ones (host name)"
    )
    lease_timeout: float = Field(
        default=60.0, gt=0, description="seconds without a heartbeat: the instance is dead"
    )
    metrics_address: Address = Field(default=None, description="host:port for /metrics")
    max_attempts: int = Field(
        default=3, ge=1, description="tries of a conversion that crashes, then conversion_crashed"
    )
    max_memory: int = Field(
        default_factory=_default_max_memory,
        gt=0,
        description="bytes each conversion process may allocate (default: 1/4 of the memory)",
    )
    conversion_timeout: float = Field(
        default=600.0,
        gt=0,
        description="seconds one conversion may take, from its turn in its process (then: a crash)",
    )

    # Hand-off to what comes next (README: Hand-off).
    on_converted: Command = Field(default=None, description="command run for each converted input")
    on_failed: Command = Field(default=None, description="command run for each failed input")
    hook_timeout: float = Field(
        default=30.0, gt=0, description="seconds a hook may run, then its process group is killed"
    )
    notify_url: HttpUrl = Field(default=None, description="URL each event is POSTed to")
    hook_attempts: int = Field(
        default=5, ge=1, description="tries of each delivery of an event, then it is dropped"
    )

    # Profiles (README: Configuration, Profiles).
    profiles: Annotated[
        list[Profile], NoDecode, BeforeValidator(json_text), AfterValidator(names_once)
    ] = Field(
        default_factory=list,
        description="[[profiles]]: settings per inbox subfolder (flag, environment: JSON)",
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
    def all_library_dirs(self) -> list[Path]:
        """Every library folder, the profiles' included, each once: what is indexed."""
        folders = [
            *self.library,
            *(f for p in self.profiles for f in p.settings().get("library", ())),
        ]
        return list(dict.fromkeys(self.resolve(folder) for folder in folders))

    @property
    def instance_name(self) -> str:
        """`instance`, or this host's name."""
        return self.instance or socket.gethostname() or "niftidrop"

    @property
    def state_path(self) -> Path:
        if self.state_dir is None:
            return self.inbox_dir / ".niftidrop"
        return self.resolve(self.state_dir)

    def folder_overlaps(self) -> list[str]:
        """Every pair of folders that lie one inside the other where niftidrop would
        feed on its own files, in words (see `folders.overlaps`)."""
        named = [
            ("inbox", self.inbox_dir),
            ("outbox", self.outbox_dir),
            ("archive", self.archive_dir),
            ("failed", self.failed_dir),
            ("state_dir", self.state_path),
            *(("library", folder) for folder in self.all_library_dirs),
        ]
        return folders.overlaps(named, recursive=self.recursive)

    def check_folders(self) -> None:
        """Raise ConfigError naming every overlap of `folder_overlaps`."""
        problems = self.folder_overlaps()
        if problems:
            raise ConfigError("overlapping folders: " + "; ".join(problems))

    def check_lease(self) -> None:
        """Raise ConfigError if a live instance could be taken for dead between two
        of its heartbeats (checked by `run`, not by `health` or `status`)."""
        if self.lease_timeout < 2 * self.heartbeat_interval:
            raise ConfigError(
                f"lease_timeout: expected at least two heartbeat intervals "
                f"({2 * self.heartbeat_interval:g} s), found {self.lease_timeout:g} s: "
                "a live instance would be taken for dead between two heartbeats"
            )

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


if not TYPE_CHECKING:  # the profile's table type needs the settings' fields first
    Profile = profile_table(Settings.model_fields, __name__)
    Settings.model_rebuild()


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
