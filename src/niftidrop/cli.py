"""The `niftidrop` command line (README: Running the service).

The parser, the help and the exit codes are `niftidrop.usage`'s; the work of each
command lives in the module it belongs to. This module loads the settings, runs
the command, says what went wrong as an error (not as an empty result) and maps
outcomes to exit codes. `main(argv)` takes its arguments so tests call it
directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from niftidrop.errors import ConfigError, ServiceError
from niftidrop.settings import Settings, load_settings
from niftidrop.usage import ExitCode, build_parser

__all__ = ["ExitCode", "build_parser", "main"]

if TYPE_CHECKING:
    from niftidrop.profiles import Profiles
    from niftidrop.spool import Spool


Command = Callable[[Settings, argparse.Namespace], int]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, by field name."""
    return {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }


def _cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    """Print the effective settings as JSON, then what `run` will do about each folder
    that is missing (notes) and what would stop it (errors, exit 2)."""
    import json

    from niftidrop.profiles import Profiles

    notes, problems = _folder_report(settings)
    problems.extend(settings.folder_overlaps())
    used = settings.for_service()  # as `run` uses them
    effective = used.model_dump(mode="json")
    effective["profiles"] = Profiles(used).report()  # each with its effective values
    print(json.dumps(effective, indent=2, sort_keys=True))
    for note in notes:
        print(f"niftidrop: {note}", file=sys.stderr)
    return ExitCode.BAD_CONFIG if _report_errors(problems) else ExitCode.OK


def _folder_report(settings: Settings) -> tuple[list[str], list[str]]:
    """(notes, problems): the folders `run` will create or warn about, and those
    that would stop it. It stops at a spool folder it cannot make or use; a library
    folder it cannot make is only logged (references may be mounted there later,
    and with missing_reference = "identity" none is needed)."""
    notes, problems = [], []
    spool = (
        ("inbox", settings.inbox_dir),
        ("outbox", settings.outbox_dir),
        ("archive", settings.archive_dir),
        ("failed", settings.failed_dir),
        ("state_dir", settings.state_path),
    )
    for label, folder in spool:
        unusable = _unusable(folder)
        if unusable is not None:
            problems.append(f"{label}: {folder} {unusable}")
        elif not os.path.lexists(folder):
            notes.append(f"{label}: {folder} does not exist yet; run will create it")
    for folder in settings.all_library_dirs:
        unusable = _unusable(folder)
        if unusable is not None:
            missing = "" if os.path.lexists(folder) else "does not exist and "
            notes.append(
                f"warning: library: {folder} {missing}{unusable}: run will warn "
                "library_unavailable, and inputs fail as no_reference until it is a folder"
            )
        elif not os.path.lexists(folder):
            notes.append(
                f"library: {folder} does not exist yet; run will create it (empty: "
                "inputs fail as no_reference until references are added)"
            )
    inbox, state = (
        _nearest_existing(folder) for folder in (settings.inbox_dir, settings.state_path)
    )
    try:
        elsewhere = inbox.stat().st_dev != state.stat().st_dev
    except OSError:  # a broken symlink on the way: reported above
        elsewhere = False
    if elsewhere:
        problems.append(
            f"state_dir: {settings.state_path} is on another file system than the inbox "
            f"{settings.inbox_dir}: it must be on the same (inputs are claimed by rename)"
        )
    return notes, problems


def _unusable(folder: Path) -> str | None:
    """Why `run` could not have `folder` as a folder; None when it is one, or when
    it is missing and could be made."""
    if folder.is_dir():
        return None
    if folder.is_symlink() and not folder.exists():
        return "is a symlink to nothing"
    if os.path.lexists(folder):
        return "exists and is not a folder"
    parent = _nearest_existing(folder.parent)
    if not parent.is_dir():
        return f"cannot be created: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    return None


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (a symlink to nothing exists here)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _missing_libraries(settings: Settings) -> list[str]:
    """An error for each library folder that is not a folder (`match`, `convert`:
    they read the library as it is, unlike `run`, which creates it)."""
    return [
        f"library: {folder} " + ("is not a folder" if os.path.lexists(folder) else "does not exist")
        for folder in settings.all_library_dirs
        if not folder.is_dir()
    ]


def _profiles(settings: Settings, args: argparse.Namespace) -> Profiles | None:
    """The profiles of `settings`, or None after an error when `--profile` names none."""
    from niftidrop.profiles import Profiles, UnknownProfile

    profiles = Profiles(settings)
    if args.profile is not None:
        try:
            profiles.named(args.profile)
        except UnknownProfile as error:
            _report_errors([f"--profile: {error}"])
            return None
    return profiles


def _cmd_match(settings: Settings, args: argparse.Namespace) -> int:
    """Print which reference each name resolves to, by which rule, and the candidates."""
    import json

    from niftidrop.library import ReferenceLibrary
    from niftidrop.profiles import inbox_relative

    profiles = _profiles(settings, args)
    if profiles is None or _report_errors(_missing_libraries(settings)):
        return ExitCode.BAD_CONFIG
    library = ReferenceLibrary.from_settings(settings)
    library.build()
    unmatched = 0
    for name in args.names:
        # A name is a path relative to the inbox (or an absolute one in it).
        relative = (
            inbox_relative(Path(name), settings.inbox_dir) if Path(name).is_absolute() else name
        )
        profile, _ = profiles.pick(args.profile, relative)
        found = library.describe(name, profile)
        unmatched += found["error"] is not None
        if args.json:
            print(json.dumps({**found, "profile": profile}))
            continue
        shown = "" if profile is None else f", profile {profile}"
        if found["error"] is None:
            print(f"{name}: {found['reference']} (rule {found['rule']}, key {found['key']}{shown})")
        else:
            print(f"{name}: {found['error']}\n    {found['message']}")
        label = "candidate" if found["reference"] is None else "other candidate"
        for other in found["candidates"]:
            if other != found["reference"]:
                print(f"    {label}: {other}")
    return ExitCode.FAILED if unmatched else ExitCode.OK


def _cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Run the service in the foreground (or, with --once, convert the inbox and exit)."""
    from niftidrop.logs import configure_logging
    from niftidrop.service import Service

    configure_logging(settings.log_format, settings.log_level)
    try:
        return Service(settings).run(once=args.once)
    except ConfigError as exc:
        print(f"niftidrop: {exc}", file=sys.stderr)
        return ExitCode.BAD_CONFIG
    except (ServiceError, OSError) as exc:  # logged as service_failed
        print(f"niftidrop: {exc}", file=sys.stderr)
        return ExitCode.SERVICE_FAILED


def _cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """Print how many files each spool folder holds and the heartbeat's age."""
    import json

    from niftidrop.spool import Spool
    from niftidrop.status import status_report

    if _report_errors(_no_spool(settings)):
        return ExitCode.BAD_CONFIG
    spool = Spool(settings)
    counts = spool.counts()
    report = status_report(spool, counts)
    if args.json:
        print(json.dumps(report))
        return ExitCode.OK
    for name, count in counts.items():
        print(f"{name:<9} {count}")
    age, state = report["heartbeat_age"], report["state"]
    print("heartbeat", "none" if age is None else f"{age:.1f} s ago ({state})")
    for each in report["instances"]:
        beat = each["heartbeat_age"]
        seen = "no lease" if beat is None else f"heartbeat {beat:.1f} s ago"
        print(
            f"instance  {each['name']} on {each['host'] or '?'} (pid {each['pid'] or '?'}): "
            f"{'live' if each['live'] else 'expired'}, {seen}, {each['claimed']} claimed"
        )
    return ExitCode.OK


def _service_state(spool: Spool) -> str | None:
    """What the last heartbeat says: "running", "stopped", or None (no heartbeat)."""
    from niftidrop.claims import read_json
    from niftidrop.status import service_state

    return service_state(read_json(spool.heartbeat_path))


def _cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when the service runs and its heartbeat is fresher than three intervals."""
    import time

    from niftidrop.spool import Spool

    spool = Spool(settings)
    age = spool.heartbeat_age(time.time())
    if age is not None and _service_state(spool) == "stopped":
        print(f"unhealthy: the service stopped (heartbeat {age:.1f} s ago)")
        return ExitCode.FAILED
    if age is not None and age < 3 * settings.heartbeat_interval:
        print(f"healthy: heartbeat {age:.1f} s ago")
        return ExitCode.OK
    seen = (
        f"no heartbeat at {spool.heartbeat_path}" if age is None else f"heartbeat {age:.1f} s ago"
    )
    print(f"unhealthy: {seen} (expected under {3 * settings.heartbeat_interval:g} s)")
    return ExitCode.FAILED


def _cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    """Move failed inputs (all, or the named ones) back into the inbox; exit 1 naming
    each NAME that is not in failed (the others are moved all the same)."""
    from niftidrop.spool import Spool

    if _report_errors(_no_spool(settings)):
        return ExitCode.BAD_CONFIG
    spool = Spool(settings)
    unknown = spool.not_failed(args.names)
    moved = spool.retry(args.names)
    for path in moved:
        print(f"back in the inbox: {path}")
    print(f"{len(moved)} input(s) moved back")
    failed_folder = settings.failed_dir
    _report_errors(f"not in failed ({failed_folder}): {name}" for name in unknown)
    return ExitCode.FAILED if unknown else ExitCode.OK


def _no_spool(settings: Settings) -> list[str]:
    """An error when the inbox does not exist: no service ever ran on these folders
    (`run` creates them), so `status` and `retry` would only report an empty spool."""
    inbox = settings.inbox_dir
    if inbox.is_dir():
        return []
    return [
        f"no spool at {settings.root.expanduser().absolute()}: the inbox {inbox} "
        + ("is not a folder" if os.path.lexists(inbox) else "does not exist")
        + " (is --root right? run creates the folders)"
    ]


def _report_errors(errors: Iterable[str]) -> bool:
    """Print each error on stderr; whether there was any."""
    found = False
    for error in errors:
        print(f"niftidrop: error: {error}", file=sys.stderr)
        found = True
    return found


def _cmd_convert(settings: Settings, args: argparse.Namespace) -> int:
    """Convert each input once: one line per input, exit 1 if any was rejected.

    With `--reference` every input uses it; otherwise the library is indexed once
    and each input's reference found by the matching rules.
    """
    from tqdm import tqdm

    from niftidrop.convert import convert_input
    from niftidrop.errors import ConversionError
    from niftidrop.profiles import inbox_relative

    out_dir: Path = args.output_dir or settings.outbox_dir
    inputs: list[Path] = args.inputs
    profiles = _profiles(settings, args)
    if profiles is None:
        return ExitCode.BAD_CONFIG
    library = None
    if args.reference is None:
        from niftidrop.library import ReferenceLibrary

        missing = _missing_libraries(settings)
        if settings.missing_reference == "identity":  # no library needed: said, not fatal
            for problem in missing:
                print(f"niftidrop: warning: {problem}", file=sys.stderr)
        elif _report_errors(missing):
            return ExitCode.BAD_CONFIG
        library = ReferenceLibrary.from_settings(settings)
        library.build()
    show_bar = len(inputs) > 1 and sys.stderr.isatty()
    failed = 0
    with tqdm(total=len(inputs), unit="file", file=sys.stderr, disable=not show_bar) as bar:
        for source in inputs:
            try:
                if not source.is_file():
                    raise FileNotFoundError(f"{source}: no such file")
                profile, chosen = profiles.pick(
                    args.profile, inbox_relative(source, settings.inbox_dir)
                )
                reference = (
                    args.reference if library is None else library.resolve(source.name, profile)
                )
                provenance = {"profile": profile}
                result = convert_input(
                    source, out_dir, reference, settings=chosen, provenance=provenance
                )
                bar.write(f"{source} -> {', '.join(str(path) for path in result.outputs)}")
                if result.labels_missing:  # as the service logs labels_incomplete
                    values = ", ".join(map(str, result.labels_missing))
                    warning = f"{source}: labels_incomplete: no name in labels for {values}"
                    bar.write(f"niftidrop: warning: {warning}", file=sys.stderr)
                if result.preview_error is not None:  # converted all the same: exit 0
                    bar.write(f"{source}: preview_failed: {result.preview_error}", file=sys.stderr)
            except ConversionError as error:
                failed += 1
                bar.write(f"{source}: {error.code.value}: {error.message}", file=sys.stderr)
            except OSError as error:
                failed += 1
                bar.write(f"niftidrop: {error}", file=sys.stderr)
            bar.update()
    return ExitCode.FAILED if failed else ExitCode.OK


_COMMANDS: dict[str, Command] = {
    "check": _cmd_check,
    "convert": _cmd_convert,
    "health": _cmd_health,
    "match": _cmd_match,
    "retry": _cmd_retry,
    "run": _cmd_run,
    "status": _cmd_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (also for --help and usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, a usage error: argparse has said it
        return stop.code if isinstance(stop.code, int) else ExitCode.BAD_CONFIG
    try:
        settings = load_settings(args.config, **_overrides(args))
    except ConfigError as exc:
        print(f"niftidrop: {exc}", file=sys.stderr)
        return ExitCode.BAD_CONFIG
    return int(_COMMANDS[args.command](settings, args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
