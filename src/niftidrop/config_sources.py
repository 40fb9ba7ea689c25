"""Where the settings come from, and configuration errors in the user's words.

The sources (README: Configuration) are, highest first, command-line flags,
`NIFTIDROP_*` environment variables and a TOML file. pydantic alone would say
"workers: Input should be a valid integer"; a user needs to know which of the
three places holds the value (the flag `--workers`, the variable
`NIFTIDROP_WORKERS`, or the TOML file and its key), the value found there and what
is allowed instead. A name that is no setting (a typo in the TOML file or in a
variable) is an error too, with the closest setting suggested.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from niftidrop.errors import ConfigError

ENV_PREFIX: Final = "NIFTIDROP_"
# A NIFTIDROP_* variable that is no setting: it names the TOML file.
CONFIG_VARIABLE: Final = ENV_PREFIX + "CONFIG"
# The variables the service gives its hook commands (README: Hand-off), by the event's
# key they carry: no settings, so a hook that runs niftidrop itself is not refused.
HOOK_VARIABLES: Final = {
    key: ENV_PREFIX + name
    for key, name in (
        ("event", "EVENT"),
        ("id", "EVENT_ID"),
        ("input", "INPUT"),
        ("outputs", "OUTPUT"),
        ("sidecar", "SIDECAR_FILE"),
        ("dseg", "DSEG_FILE"),
        ("archived", "ARCHIVED"),
        ("failed_as", "FAILED_AS"),
        ("error_file", "ERROR_FILE"),
    )
}
SYSTEM_CONFIG: Final = Path("/etc/niftidrop/niftidrop.toml")
LOCAL_CONFIG: Final = Path("niftidrop.toml")
# A value quoted in a message is cut after this many characters (a pasted matrix).
_LONGEST_SHOWN: Final = 120
_KIND_WORDS: Final[dict[Any, str]] = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "text",
    Path: "a path",
}
# The TOML file of the settings being built (`reading_toml`), for the model's sources.
_toml_file: ContextVar[Path | None] = ContextVar("niftidrop_toml_file", default=None)


def flag(name: str) -> str:
    """The command-line flag of a setting: `max_attempts` is `--max-attempts`."""
    return "--" + name.replace("_", "-")


def find_config_file(explicit: Path | None = None) -> Path | None:
    """The TOML file to read: `--config`, `NIFTIDROP_CONFIG`, ./niftidrop.toml, /etc."""
    from_env = os.environ.get(CONFIG_VARIABLE)
    if explicit is not None:
        named, origin = explicit, "flag --config"
    elif from_env:
        named, origin = Path(from_env), f"environment variable {CONFIG_VARIABLE}"
    else:
        return next((path for path in (LOCAL_CONFIG, SYSTEM_CONFIG) if path.is_file()), None)
    if not named.is_file():
        raise ConfigError(f"{origin}: file {str(named)!r} does not exist")
    return named


@contextmanager
def reading_toml(path: Path | None) -> Iterator[None]:
    """While inside, the settings built read `path` as their TOML file (None: none)."""
    token = _toml_file.set(path)
    try:
        yield
    finally:
        _toml_file.reset(token)


def toml_file_being_read() -> Path | None:
    """The TOML file that `reading_toml` chose for the settings being built."""
    return _toml_file.get()


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file's tables as a dict; a ConfigError naming the file and the line
    when it is not valid TOML or cannot be read."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def allowed(name: str, field: FieldInfo, words: Mapping[str, str] | None = None) -> str:
    """What setting `name` accepts, in words: `words[name]` (for a setting whose
    validator checks more than its type), else its type and range, or its choices."""
    if words and name in words:
        return words[name]
    kinds = [kind for kind in _alternatives(field.annotation) if kind is not type(None)]
    return " or ".join(_kind_words(kind) for kind in kinds) + _bounds(field.metadata)


class Origin(NamedTuple):
    """Where one setting's value came from, in words, and the value given there
    (`given` is False for a default)."""

    where: str
    value: Any
    given: bool


class Sources:
    """The values each source gave (flags, environment, the TOML file), to say where
    a setting came from when it is wrong."""

    def __init__(
        self, flags: Mapping[str, Any], environ: Mapping[str, str], toml_file: Path | None
    ) -> None:
        self.flags = flags
        self.environ = environ
        # pydantic-settings matches variable names in any case: so do we.
        self.variables = {
            name.upper(): name for name in environ if name.upper().startswith(ENV_PREFIX)
        }
        self.toml_file = toml_file
        self.toml = read_toml(toml_file) if toml_file is not None else {}

    def __repr__(self) -> str:
        return f"Sources(flags={sorted(self.flags)}, toml_file={self.toml_file!r})"

    def origin(self, name: str, *, environment: bool = True) -> Origin:
        """Where setting `name` came from: the highest source that gives it (an unknown
        name never comes from the environment: pydantic reads only known variables)."""
        if name in self.flags:
            return Origin(f"flag {flag(name)}", self.flags[name], True)
        variable = self.variables.get(ENV_PREFIX + name.upper()) if environment else None
        if variable is not None:
            return Origin(f"environment variable {variable}", self.environ[variable], True)
        if name in self.toml:
            return Origin(f"{self.toml_file}, key {name}", self.toml[name], True)
        return Origin(f"{name} (the default)", None, False)

    def unknown_variables(self, names: Iterable[str]) -> list[str]:
        """A problem for each `NIFTIDROP_*` variable that names no setting."""
        settings = list(names)
        known = {ENV_PREFIX + name.upper() for name in settings} | {CONFIG_VARIABLE}
        known |= set(HOOK_VARIABLES.values())
        return [
            f"environment variable {variable}: unknown setting"
            + _suggestion(
                upper.removeprefix(ENV_PREFIX), settings, lambda name: ENV_PREFIX + name.upper()
            )
            for upper, variable in sorted(self.variables.items())
            if upper not in known
        ]

    def explain(
        self,
        model: type[BaseModel],
        error: ValidationError,
        words: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Each problem of `error` as one line: where the value came from, what is
        allowed (`allowed` with `words`) and what was found, or for an unknown name
        the closest setting."""
        return [self._explain(model, detail, words) for detail in error.errors()]

    def _explain(
        self, model: type[BaseModel], detail: ErrorDetails, words: Mapping[str, str] | None
    ) -> str:
        loc = detail["loc"]
        if not loc:
            return f"settings: {detail['msg']}"
        unknown = detail["type"] == "extra_forbidden" and len(loc) == 1
        origin = self.origin(str(loc[0]), environment=not unknown)
        where = origin.where + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:]
        )
        if detail["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            names = list(parent.model_fields) if parent is not None else []
            known = _suggestion(str(loc[-1]), names, str, listed=len(loc) > 1)
            return f"{where}: unknown setting" + known
        name, field = _field_at(model, loc)
        # The value as the user wrote it, unless the problem is inside it (a profile's key).
        top = field is not None and field is model.model_fields.get(str(loc[0]))
        value = origin.value if origin.given and top else detail["input"]
        found = f", found {_shown(value)}"
        reason = (
            str(detail.get("ctx", {}).get("error", "")) if detail["type"] == "value_error" else ""
        )
        if reason.startswith("expected "):  # a reason that names what it found says so
            return f"{where}: {reason}" + ("" if ", found " in reason else found)
        expected = allowed(name, field, words) if field is not None else detail["msg"].lower()
        if detail["type"] == "missing":
            return f"{where}: missing; expected {expected}"
        return f"{where}: expected {expected}{found}" + (f" ({reason})" if reason else "")


def _suggestion(
    name: str, names: Sequence[str], spelled: Callable[[str], str], *, listed: bool = False
) -> str:
    """ "; did you mean `workers`?" for the setting closest to `name`, or where to look
    (`listed`: the keys allowed, for a table inside the settings, such as a profile)."""
    close = difflib.get_close_matches(name.lower(), names, n=1)
    if close:
        return f"; did you mean `{spelled(close[0])}`?"
    if listed:
        return f"; expected one of: {', '.join(names)}"
    return " (the README's Configuration section lists every setting)"


def _shown(value: Any) -> str:
    """`value` as a message quotes it: JSON (strings in double quotes), cut if long."""
    shown = json.dumps(value, default=str, ensure_ascii=False)
    return shown if len(shown) <= _LONGEST_SHOWN else shown[: _LONGEST_SHOWN - 1] + "…"


def _alternatives(annotation: Any) -> tuple[Any, ...]:
    """The members of a union (`X | None`), or the annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _kind_words(kind: Any) -> str:
    """One type in words: "a whole number", "one of: auto, inotify, polling", ..."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of: " + ", ".join(str(choice) for choice in typing.get_args(kind))
    if origin in (list, tuple):
        return "a list"
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return "a table"
    return _KIND_WORDS.get(kind, str(getattr(kind, "__name__", kind)))


def _bounds(metadata: Sequence[Any]) -> str:
    """A field's range constraints in words: " from 0 to 3", ", at least 1", ..."""
    limits = {
        kind: getattr(item, kind)
        for item in metadata
        if isinstance(item, annotated_types.BaseMetadata)
        for kind in ("ge", "gt", "le", "lt", "min_length")
        if getattr(item, kind, None) is not None
    }
    if "ge" in limits and "le" in limits:
        return f" from {limits['ge']} to {limits['le']}"
    words = {"ge": "at least {}", "gt": "above {}", "le": "at most {}", "lt": "below {}"}
    parts = [words[kind].format(limit) for kind, limit in limits.items() if kind in words]
    if "min_length" in limits:
        parts.append(f"at least {limits['min_length']} character(s)")
    return ", " + " and ".join(parts) if parts else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, also inside a list or an optional (`list[Profile]`)."""
    for kind in _alternatives(annotation):
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return kind
        for argument in typing.get_args(kind):
            found = _model_in(argument)
            if found is not None:
                return found
    return None


def _model_at(model: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model whose keys an error location's last part is one of."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: the same model as the list's
        if current is None or part not in current.model_fields:
            return None
        current = _model_in(current.model_fields[part].annotation)
    return current


def _field_at(model: type[BaseModel], loc: Sequence[int | str]) -> tuple[str, FieldInfo | None]:
    """The deepest field an error location names, and its name (list items and union
    members skipped); ("", None) if it names none."""
    name, field = "", None
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        if current is None or part not in current.model_fields:
            break
        name, field = part, current.model_fields[part]
        current = _model_in(field.annotation)
    return name, field
