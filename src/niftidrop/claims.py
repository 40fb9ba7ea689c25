"""A claim and the records kept in its claim folder (README: File protocol).

`SpoolFolders` holds the folders of one service's spool, the lock on its state
folder, the state folder's owner id (the owner part of its temporary names) and
writes the records of a claim folder (see `niftidrop.spool` for the layout);
`Claimer`, `Finisher` and `Spool` build on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

from niftidrop.errors import ConfigError, ConversionError
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
LOCK: Final = "lock"
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

    `links` is the input's hard-link count when this process claimed it (0 for a
    claim found at start): a higher count means it may be in archive or failed.
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
    """The spool folders of one service, its lock and owner id, and the records it
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
        self.claims_folder = self.state / CLAIMS
        self.heartbeat_path = self.state / HEARTBEAT
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
        self._lock_file: IO[bytes] | None = None

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
        """Take the state folder for this process; a second service on it is refused."""
        handle = (self.state / LOCK).open("a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(
                f"state_dir: {self.state} is in use by another running niftidrop"
            ) from None
        self._lock_file = handle
        _ = self.owner  # made now, once, rather than by the first write that needs it

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # Temporary files and records.

    def remove_stale_temporaries(self) -> int:
        """Delete the hidden temporary files this service left behind (at start).

        In outbox, archive and failed only this state folder's own (`owner`): other
        services may share those folders, and their files may be in flight. Every
        temporary file in the state folder is this service's.
        """
        removed = 0
        for top in (self.outbox, self.archive_folder, self.failed_folder, self.state):
            for root, _, files in os.walk(top):
                for name in files:
                    if is_owned_by(name, self.owner) or (top == self.state and is_temp_name(name)):
                        with contextlib.suppress(FileNotFoundError):
                            (Path(root) / name).unlink()
                            removed += 1
        return removed

    @functools.cached_property
    def owner(self) -> str:
        """This state folder's id: the owner part of the temporary names it writes."""
        return _state_id(self.state / OWNER_FILE)

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

    def _write_record(
        self, path: Path, data: Mapping[str, Any], kind: str, *, durable: bool = True
    ) -> None:
        write_json_atomic(path, data, durable=durable and self.durable, owner=self.owner, kind=kind)


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


def _is_state_id(text: str) -> bool:
    return len(text) == 2 * STATE_ID_BYTES and all(char in "0123456789abcdef" for char in text)
