"""The `niftidrop` command line's parser and help (README: Running the service).

Every settings field is also a flag (`--inbox`, `--no-fsync`, `--library A
--library B`) built from `Settings.model_fields`: its choices are its `Literal`'s,
its default the field's. Each command's `--help` says what it does, its exit
codes and the settings that concern it; the others are accepted, and listed by
`--help-settings`, so that each help fits on a screen (40 lines).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Final, Literal, NoReturn

from pydantic.fields import FieldInfo

from niftidrop.settings import Settings
from niftidrop.version import __version__


class ExitCode(IntEnum):
    """Exit statuses of every command."""

    OK = 0
    # The command ran, and something it reports failed: an input rejected, a name
    # without a reference, a name to retry that is not in failed, no fresh heartbeat.
    FAILED = 1
    # The configuration is wrong: an invalid setting or usage, overlapping folders,
    # a folder that must exist and does not (the library `match` reads, the spool
    # `status` counts), a folder `run` could not use.
    BAD_CONFIG = 2
    # The service could not start or go on (a folder it cannot create, its inbox
    # replaced while running): a restart may help, unlike BAD_CONFIG.
    SERVICE_FAILED = 3


@dataclass(frozen=True)
class CommandHelp:
    """What one command's help says: `summary` in the list of commands, then its
    usage, a paragraph on what it does, the settings that concern it (by field
    name; `config` is the TOML file) and what each exit code it returns means."""

    name: str
    summary: str
    usage: str
    description: str
    settings: tuple[str, ...]
    exits: dict[ExitCode, str]


_BAD_CONFIG = "bad configuration or usage"
_FOLDERS = ("root", "inbox", "outbox", "archive", "failed", "library", "state_dir")
_CONVERSION = ("dtype", "axis_order", "channels", "on_conflict", "sidecar")

COMMANDS: Final = (
    CommandHelp(
        "run",
        "the service: convert inputs as they arrive, until stopped",
        "niftidrop run [--once] [SETTINGS]",
        "Run the service in the foreground: create the folders that are missing, "
        "index the library, finish what a previous run left claimed, convert the "
        "inputs waiting (oldest first), then watch the inbox and convert each "
        "complete .npy/.npz file that arrives, until SIGTERM or SIGINT (SIGHUP: "
        "re-index the library, rescan the inbox).",
        ("config", *_FOLDERS[:-1], "workers", "log_format", "log_level", "metrics_address"),
        {
            ExitCode.OK: "stopped cleanly; with --once: every input converted",
            ExitCode.FAILED: "with --once: some input failed, or was left incomplete",
            ExitCode.BAD_CONFIG: f"{_BAD_CONFIG}, or a live instance of this name serves the spool",
            ExitCode.SERVICE_FAILED: "the service could not start or go on (logged as "
            "service_failed)",
        },
    ),
    CommandHelp(
        "convert",
        "convert .npy/.npz files once, outside the spool",
        "niftidrop convert [-o DIR] [--reference REF] [SETTINGS] IN...",
        "Convert each input file to NIfTI once, with its profile's settings, and "
        "print '<input> -> <output>' or '<input>: <code>: <message>' for each. With "
        "--reference every input takes that scan's geometry; else the service's "
        "matching rules find each input's reference. Inputs are read, never moved.",
        ("config", "library", "missing_reference", *_CONVERSION),
        {
            ExitCode.OK: "every input converted",
            ExitCode.FAILED: "some input was rejected or could not be read",
            ExitCode.BAD_CONFIG: f"{_BAD_CONFIG}, or a library folder that is missing",
        },
    ),
    CommandHelp(
        "match",
        "which reference each input name resolves to, and why",
        "niftidrop match [--json] [SETTINGS] NAME...",
        "Index the library once and print, for each input file name, the reference "
        "NIfTI the service would pair it with, the rule that chose it (exact, "
        "reference_prefix, input_prefix or key_pattern), its key and the other "
        "candidates: the first thing to run when an output has the wrong geometry or "
        "none. The names need not exist; only the library is read.",
        ("config", "root", "library", "separators", "key_pattern"),
        {
            ExitCode.OK: "every name has one reference",
            ExitCode.FAILED: "some name has none, or an ambiguous one",
            ExitCode.BAD_CONFIG: f"{_BAD_CONFIG}, or a library folder that is missing",
        },
    ),
    CommandHelp(
        "check",
        "validate settings and folders; print the settings run uses",
        "niftidrop check [SETTINGS]",
        "Validate the settings from every source (flags, NIFTIDROP_* variables, the "
        "TOML file) and the folders they name, without creating or changing anything, "
        "and print the settings as run would use them, as JSON. A folder that does "
        "not exist yet is reported as what run will do about it; what would stop run "
        "is reported as an error.",
        ("config", *_FOLDERS),
        {
            ExitCode.OK: "run can start with these settings (missing folders it creates)",
            ExitCode.BAD_CONFIG: f"{_BAD_CONFIG}; overlapping folders; a spool folder "
            "that is a file or cannot be created; a state_dir on another file system "
            "than the inbox",
        },
    ),
    CommandHelp(
        "status",
        "count the files in each spool folder, show the heartbeat",
        "niftidrop status [--json] [SETTINGS]",
        "Count the inputs waiting in the inbox, the claimed inputs, the outputs, the "
        "archived and the failed inputs, and show how old the service's last "
        "heartbeat is and whether it said running or stopped. Read only: safe while "
        "the service runs.",
        ("config", "root", "inbox", "outbox", "archive", "failed", "state_dir", "instance"),
        {
            ExitCode.OK: "counted",
            ExitCode.BAD_CONFIG: f"{_BAD_CONFIG}, or no spool there (no inbox: --root?)",
        },
    ),
    CommandHelp(
        "health",
        "exit 0 if the service is alive (a container HEALTHCHECK)",
        "niftidrop health [SETTINGS]",
        "For container health checks and monitors: check that the service's "
        "heartbeat (<state_dir>/instances/<instance>/heartbeat.json, rewritten every "
        "heartbeat_interval seconds) is fresher than three intervals and does not say "
        "that the service stopped, and print one line saying so or why not.",
        ("config", "root", "inbox", "state_dir", "instance", "heartbeat_interval"),
        {
            ExitCode.OK: "healthy",
            ExitCode.FAILED: "unhealthy: no heartbeat, a stale one, or the service stopped",
            ExitCode.BAD_CONFIG: _BAD_CONFIG,
        },
    ),
    CommandHelp(
        "retry",
        "move failed inputs back into the inbox",
        "niftidrop retry [SETTINGS] [NAME...]",
        "Move failed inputs back into the inbox under their original relative path, "
        "removing their .error.json, so that the service converts them again: every "
        "failed input, or those named (by file name, by path relative to the failed "
        "folder, or by the file's path). A NAME not in failed is reported; the "
        "others are moved all the same.",
        ("config", "root", "inbox", "failed"),
        {
            ExitCode.OK: "moved back (without NAME: every failed input, maybe none)",
            ExitCode.FAILED: "some NAME is not in failed (each one is named)",
            ExitCode.BAD_CONFIG: f"{_BAD_CONFIG}, or no spool there (no inbox: --root?)",
        },
    ),
)

_DESCRIPTION = (
    "Turn the NumPy predictions of medical-imaging models (.npy, .npz) into NIfTI "
    "files with the exact geometry of their reference scans: as a service that "
    "watches an inbox (run), or once (run --once, convert). 'niftidrop COMMAND "
    "--help' says what each command does and the settings that concern it."
)
_EXITS = {
    ExitCode.OK: "done",
    ExitCode.FAILED: "done, and something failed: an input, a match, a retry, health",
    ExitCode.BAD_CONFIG: "bad configuration or usage",
    ExitCode.SERVICE_FAILED: "run: the service could not start or go on",
}
_SETTINGS_NOTE = (
    "Every setting is a flag (--workers 4), an environment variable "
    "(NIFTIDROP_WORKERS=4) and a key of the TOML file (workers = 4), for every "
    'command: --help-settings lists them all; README "Configuration" explains them.'
)
_COMMAND_SETTINGS = (
    'Each is also NIFTIDROP_<NAME> and a TOML key (README "Configuration"); every '
    "other setting is accepted too: --help-settings lists them all."
)
_ALL_SETTINGS = (
    'Every setting of niftidrop (README "Configuration"). Each is a flag '
    "(--workers 4), an environment variable (NIFTIDROP_WORKERS=4) and a key of the "
    "TOML file (workers = 4); a flag beats the environment, which beats the file: "
    "--config PATH, else NIFTIDROP_CONFIG, else ./niftidrop.toml, else "
    "/etc/niftidrop/niftidrop.toml. Every command accepts every setting."
)

# Help for the settings whose field has no description of its own, and what a
# default of None means.
_NONE_MEANS: Final = {
    "state_dir": "<inbox>/.niftidrop",
    "npz_key": "the first",
    "metrics_address": "off",
    "default_affine": "the identity",
}
_CONFIG_HELP = "TOML settings file (default: ./niftidrop.toml)"
_PROFILE_HELP = "the profile whose settings apply (default: by path)"
# A help fits in 40 lines of an 80-column terminal, and is laid out so on any.
_WIDTH = 80


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout at a fixed width, with descriptions and epilogs kept as
    `_paragraph` wrapped them."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=26, width=_WIDTH - 2)


def _paragraph(text: str) -> str:
    return textwrap.fill(text, _WIDTH - 2)


def _exit_codes(exits: dict[ExitCode, str]) -> str:
    lines = ["exit codes:"]
    for code, meaning in exits.items():
        indent = f"  {code:d}  "
        lines.append(
            textwrap.fill(
                meaning, _WIDTH - 2, initial_indent=indent, subsequent_indent=" " * len(indent)
            )
        )
    return "\n".join(lines)


def choices(field: FieldInfo) -> tuple[str, ...] | None:
    """The values a `Literal` field allows (also inside `X | None`), or None."""
    annotation: Any = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is Literal:
        return tuple(str(value) for value in typing.get_args(annotation))
    return None


def default_text(field: FieldInfo, none_means: str = "none") -> str:
    """A field's default as its help shows it: as a TOML file spells it, and for a
    number a factory computes, that it is this machine's."""
    value = field.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return none_means
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and field.default_factory is not None:
        return f"{value} on this machine"  # measured on the host: its CPUs, its memory
    return str(value)


def setting_help(name: str, field: FieldInfo) -> str:
    """One setting's help: what it is, then its default."""
    text = field.description or ""
    if name == "library":
        text += "; the flag repeats"
    if "(default:" in text:  # the description says it (in words: "1/4 of the memory")
        return text
    return f"{text} (default: {default_text(field, _NONE_MEANS.get(name, 'none'))})"


def _metavar(name: str, field: FieldInfo) -> str:
    allowed = choices(field)
    if allowed is not None:
        return "{" + ",".join(allowed) + "}"
    annotation = str(field.annotation)
    if "list" in annotation and name != "library":
        return "JSON"
    if "Path" in annotation:
        return "PATH"
    if name.endswith(("_seconds", "_timeout", "_interval", "_wait")):
        return "SECONDS"
    if field.annotation is int:
        return "N"
    return "NUMBER" if field.annotation is float else "TEXT"


def add_settings(parser: argparse.ArgumentParser, shown: Sequence[str] | None) -> None:
    """One flag per setting (and `--config`); those not in `shown` (None: all) are
    accepted but left out of the help."""
    group = parser.add_argument_group(
        "settings", None if shown is None else _paragraph(_COMMAND_SETTINGS)
    )

    def visible(name: str, text: str) -> str:
        hidden = shown is not None and name not in shown
        return argparse.SUPPRESS if hidden else text.replace("%", "%%")

    group.add_argument(
        "--config", type=Path, default=None, metavar="PATH", help=visible("config", _CONFIG_HELP)
    )
    for name, field in Settings.model_fields.items():
        text = visible(name, setting_help(name, field))
        options: dict[str, Any] = {"dest": name, "default": None, "help": text}
        if field.annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["metavar"] = _metavar(name, field)
            if name == "library":
                options["action"] = "append"
        group.add_argument("--" + name.replace("_", "-"), **options)


def settings_help() -> str:
    """Every setting with its flag, choices and default (`--help-settings`)."""
    parser = argparse.ArgumentParser(
        prog="niftidrop",
        usage=argparse.SUPPRESS,
        description=_paragraph(_ALL_SETTINGS),
        add_help=False,
        formatter_class=_Formatter,
    )
    add_settings(parser, shown=None)
    return parser.format_help()


class _SettingsHelpAction(argparse.Action):
    """`--help-settings`: print every setting, then exit 0 (as `--help` does)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> NoReturn:
        sys.stdout.write(settings_help())
        parser.exit()


_HELP_SETTINGS: Final[dict[str, Any]] = {
    "action": _SettingsHelpAction,
    "help": "list every setting, its choices and default",
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser: global options and one subcommand per command; the chosen
    command's name is `command` in the parsed arguments."""
    parser = argparse.ArgumentParser(
        prog="niftidrop",
        usage="niftidrop [-h] [--version] [--help-settings] COMMAND ...",
        description=_paragraph(_DESCRIPTION),
        epilog=_exit_codes(_EXITS) + "\n\n" + _paragraph(_SETTINGS_NOTE),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"niftidrop {__version__}")
    parser.add_argument("--help-settings", **_HELP_SETTINGS)
    commands = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="COMMAND"
    )
    parsers = {}
    for command in COMMANDS:
        sub = commands.add_parser(
            command.name,
            help=command.summary,
            usage=command.usage,
            description=_paragraph(command.description),
            epilog=_exit_codes(command.exits),
            formatter_class=_Formatter,
        )
        sub.add_argument("--help-settings", **_HELP_SETTINGS)
        parsers[command.name] = sub

    convert = parsers["convert"]
    convert.add_argument("inputs", nargs="+", type=Path, metavar="IN", help=".npy or .npz files")
    convert.add_argument(
        "-o", "--output-dir", type=Path, metavar="DIR", help="output folder (default: outbox)"
    )
    convert.add_argument("--reference", type=Path, metavar="REF", help="reference for every input")
    match = parsers["match"]
    for chosen in (convert, match):
        chosen.add_argument("--profile", metavar="NAME", help=_PROFILE_HELP)
    match.add_argument("names", nargs="+", metavar="NAME", help="input file names")
    match.add_argument("--json", action="store_true", help="one JSON object per name")
    parsers["run"].add_argument(
        "--once", action="store_true", help="convert what is in the inbox now, then exit"
    )
    parsers["status"].add_argument("--json", action="store_true", help="one JSON object")
    parsers["retry"].add_argument(
        "names", nargs="*", metavar="NAME", help="failed inputs (default: all)"
    )
    for command in COMMANDS:
        add_settings(parsers[command.name], command.settings)
    return parser
