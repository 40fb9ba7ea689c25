"""A claim and the records kept in its claim folder (README: File protocol).

`SpoolFolders` holds the folders of one instance's spool, its lease on its name
(`niftidrop.instances`), its owner id (the owner part of its temporary names) and
writes the records of a claim folder (see `niftidrop.spool` for the layout);
`Claimer`, `Finisher` and `Spool` build on it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final

from niftidrop.errors import ConfigError, ConversionError
from niftidrop.fs_probe import fs_time
from niftidrop.instances import INSTANCES, InstanceLease, read_lease
from niftidrop.names import input_stem, is_owned_by, is_temp_name, temp_path_for
from niftidrop.settings import Settings
from niftidrop.version import __version__
from niftidrop.writer import discard, link_exclusive, write_json_atomic

CLAIMS: Final = "claimed"
CONVERTED_MARKER: Final = ".converted.json"
FAILURE_MARKER: Final = ".failure.json"
MOVE_RECORD: Final = ".moving.json"
COMMIT_RECORD: Final = ".committing.json"
OWNER_FILE: Final = "owner"
ARCHIVE: Final = "archive"
FAILED: Final = "failed"
ERROR_SUFFIX: Final = ".error.json"
HEARTBEAT: Final = "heartbeat.json"
LEASE_FILE: Final = "lease.json"
# Empty token folders kept for the next claims; more than that (after a burst of
# retried claims) are removed.
SPARE_FOLDERS: Final = 64
STATE_ID_BYTES: Final = 4


def now_iso() -> str:
    """The current time, ISO 8601 in UTC."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Claim:
    """An input taken from the inbox: `folder` is its token folder, `relative` its
    path inside the inbox (kept so outputs and archive mirror the inbox).

    `links` is the input's hard-link count when this process claimed it: a higher
    count means it may be in archive or failed. It is 0 for a claim found at start
    or adopted, which archive and failed are searched for.
    """

    folder: Path
    relative: PurePosixPath
    links: int = field(default=0, compare=False)

    @functools.cached_property
    def path(self) -> Path:
        # Asked for at every step of a claim: joined once.
        return self.folder / self.relative

    @property
    def name(self) -> str:
        return self.relative.name

    @property
    def stem(self) -> str:
        return input_stem(self.relative.name)

    @property
    def subfolder(self) -> PurePosixPath:
        return self.relative.parent


@dataclass(frozen=True)
class Converted:
    """The input's output is durable and the input archived (or deleted)."""

    claim: Claim
    summary: dict[str, Any]
    archived_as: Path | None


@dataclass(frozen=True)
class Failed:
    """The input is in failed with its `.error.json`."""

    claim: Claim
    record: dict[str, Any]
    failed_as: Path


Outcome = Converted | Failed
# Turns a claim into the summary of its conversion; raises ConversionError or OSError.
Converter = Callable[[Claim], dict[str, Any]]


def error_record(claim: Claim, error: ConversionError) -> dict[str, Any]:
    """The `.error.json` content for a rejected input (README: error codes)."""
    record: dict[str, Any] = {
        "input": str(claim.relative),
        "error": error.code.value,
        "message": error.message,
        "failed_at": now_iso(),
        "niftidrop_version": __version__,
    }
    if error.reference is not None:
        record["reference"] = str(error.reference)
    if error.candidates:
        record["candidates"] = [str(path) for path in error.candidates]
    return record


class SpoolFolders:
    """The spool folders of one instance, its lease and owner id, and the records it
    writes in claim folders."""

    def __init__(self, settings: Settings) -> None:
        # Resolved once, at start: an inbox reached through a symlink (`/srv/spool`
        # pointing to a mount) is watched, scanned and claimed from as the folder it
        # is now (the watch never follows a symlink).
        self.inbox = settings.inbox_dir.resolve()
        self.outbox = settings.outbox_dir
        self.archive_folder = settings.archive_dir
        self.failed_folder = settings.failed_dir
        self.state = settings.state_path
        self.instance = settings.instance_name
        self.lease_timeout = settings.lease_timeout
        # Everything of this instance's own: `<state>/instances/<name>/`.
        self.instance_folder = self.state / INSTANCES / self.instance
        self.claims_folder = self.instance_folder / CLAIMS
        self.heartbeat_path = self.instance_folder / HEARTBEAT
        # Where an earlier version, one instance per state folder, kept its claims.
        self.legacy_claims_folder = self.state / CLAIMS
        self.recursive = settings.recursive
        self.durable = settings.fsync
        self.delete_after_success = settings.after_success == "delete"
        self.remember_conversions = any(  # a profile's on_conflict too (README: Profiles)
            each not in (None, "overwrite")
            for each in (
                settings.on_conflict,
                *(p.settings().get("on_conflict") for p in settings.profiles),
            )
        )
        self.lease = InstanceLease(self.state, self.instance, lease_timeout=settings.lease_timeout)
        # Claim folder -> the records this process has written in it since it took the
        # folder, empty, for a claim (`Claimer.claim`). Only this process writes a
        # claim's records (its conversion, `.committing.json`): the others are not
        # there, and need not be looked for (a read or unlink that finds nothing
        # costs a system call, and the interpreter lock, per record per input).
        self._written: dict[Path, set[str]] = {}

    def __repr__(self) -> str:
        return f"Spool(inbox={str(self.inbox)!r}, state={str(self.state)!r})"

    # Set-up.

    def create_folders(self) -> None:
        """Create every spool folder that is missing; the state folder must be able to
        receive inputs by rename (same file system as the inbox)."""
        for folder in (self.inbox, self.outbox, self.archive_folder, self.failed_folder):
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"{folder} exists and is not a folder")
            folder.mkdir(parents=True, exist_ok=True)
        self.claims_folder.mkdir(parents=True, exist_ok=True)
        if self.inbox.stat().st_dev != self.state.stat().st_dev:
            raise ConfigError(
                f"state_dir: expected a folder on the inbox's file system (inputs are "
                f"claimed by rename), found {self.state} on another one"
            )

    def lock(self) -> None:
        """Take the lease on this instance's name: a second live instance with the
        same name, on this host or another, is refused (`NameTaken`, a ConfigError)."""
        self.lease.take()
        _ = self.owner  # made now, once, rather than by the first write that needs it

    def unlock(self) -> None:
        self.lease.give_up()

    # Temporary files and records.

    def remove_stale_temporaries(self) -> int:
        """Delete the hidden temporary files this instance left behind (at start), and
        those of instances whose lease has expired; never a live instance's.

        Temporary names carry their instance's owner id (`owner`): in outbox, archive
        and failed, which other instances and services share, only those of this
        instance and of expired ones go. In the state folder, every temporary file in
        this instance's folder and in expired instances' folders goes.
        """
        expired = self.expired_instances()
        owners = [self.owner, *(owner for _, owner in expired if owner)]
        folders = [self.instance_folder, *(self.state / INSTANCES / name for name, _ in expired)]
        return self.remove_temporaries(owners, folders)

    def remove_temporaries(self, owners: list[str], state_folders: list[Path]) -> int:
        """Delete the temporary files of `owners` in outbox, archive and failed, and
        every temporary file in `state_folders`."""
        removed = 0
        tops = [(top, False) for top in (self.outbox, self.archive_folder, self.failed_folder)]
        for top, every in tops + [(folder, True) for folder in state_folders]:
            for root, _, files in os.walk(top):
                for name in files:
                    mine = any(is_owned_by(name, owner) for owner in owners)
                    if mine or (every and is_temp_name(name)):
                        with contextlib.suppress(FileNotFoundError):
                            (Path(root) / name).unlink()
                            removed += 1
        return removed

    def expired_instances(self) -> list[tuple[str, str]]:
        """(name, owner id) of every other instance on this state folder whose lease
        has expired, by the file system's clock, or that holds none."""
        root = self.state / INSTANCES
        try:
            names = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        now = fs_time(root)
        found = []
        for name in names:
            if name == self.instance or name.startswith("."):
                continue
            lease = read_lease(root / name / LEASE_FILE, name, now=now)
            if lease is not None and lease.live(self.lease_timeout):
                continue
            owner = _read_state_id(root / name / OWNER_FILE)
            found.append((name, owner or ""))
        return found

    @functools.cached_property
    def owner(self) -> str:
        """This instance's id: the owner part of the temporary names it writes."""
        self.instance_folder.mkdir(parents=True, exist_ok=True)
        return _state_id(self.instance_folder / OWNER_FILE)

    def owner_for(self, claim: Claim) -> str:
        """The owner part of the temporary names written for `claim` (its outputs, a
        copy of its input): no other claim in flight has the same."""
        return f"{self.owner}-{claim.folder.name}"

    def discard_temporaries(self, claim: Claim) -> int:
        """Remove what a conversion of `claim` that died (its process killed) left in
        the outbox; the temporaries of other conversions in flight stay."""
        owner = self.owner_for(claim)
        folder = self.outbox / claim.subfolder
        try:
            names = [entry.name for entry in folder.iterdir()]
        except OSError:
            return 0
        mine = [name for name in names if is_owned_by(name, owner)]
        for name in mine:
            discard(folder / name)
        return len(mine)

    def _record(self, claim: Claim, name: str) -> dict[str, Any] | None:
        """The record `name` in `claim`'s folder (None if missing or unreadable); not
        read when this process took the folder empty and has not written it since."""
        return read_json(claim.folder / name) if self._may_hold(claim, name) else None

    def _may_hold(self, claim: Claim, name: str) -> bool:
        """Whether `claim`'s folder may hold the record `name` (see `_record`)."""
        written = self._written.get(claim.folder)
        return written is None or name in written or name == COMMIT_RECORD

    def _write_record(
        self,
        path: Path,
        data: Mapping[str, Any],
        kind: str,
        *,
        durable: bool = True,
        indent: int | None = None,
    ) -> None:
        written = self._written.get(path.parent)
        if written is not None:
            written.add(path.name)  # before the write: one that fails may leave it
        write_json_atomic(
            path, data, durable=durable and self.durable, owner=self.owner, kind=kind, indent=indent
        )


def _state_id(path: Path) -> str:
    """The id kept in `path`, made (once, race free) if there is none."""
    with contextlib.suppress(FileNotFoundError):
        found = path.read_text().strip()
        if _is_state_id(found):
            return found
    made = secrets.token_hex(STATE_ID_BYTES)
    temporary = temp_path_for(path)
    temporary.write_text(made + "\n")
    try:
        if not link_exclusive(temporary, path):  # never replaces an id another start made
            found = path.read_text().strip()
            if _is_state_id(found):
                return found
            temporary.replace(path)  # an unreadable id (a torn write): this one instead
    finally:
        discard(temporary)
    return made


def _read_state_id(path: Path) -> str | None:
    """The id kept in `path`, or None if there is none (or it is unreadable)."""
    try:
        found = path.read_text().strip()
    except OSError:
        return None
    return found if _is_state_id(found) else None


def _is_state_id(text: str) -> bool:
    return len(text) == 2 * STATE_ID_BYTES and all(char in "0123456789abcdef" for char in text)
