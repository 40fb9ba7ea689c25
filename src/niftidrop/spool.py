"""The file protocol (README: File protocol): inbox → claimed → outbox + archive, or failed.

Layout of the state folder:

    <state>/claimed/<token>/<rel>/<name>    a claimed input
    <state>/claimed/<token>/.converted.json  its output is durable (summary)
    <state>/claimed/<token>/.failure.json    it was rejected (the error record)
    <state>/claimed/<token>/.moving.json     where in archive or failed it is going
    <state>/claimed/<token>/.committing.json the inodes of its outputs (rename, fail)
    <state>/heartbeat.json, <state>/lock
    <state>/owner                            this state folder's id (temporary names)

Each claim has a token folder to itself, made atomically by `mkdtemp`, so two
inputs with the same name never meet, and the relative path survives a crash.
A token folder outlives its claim: once the input has left, the folder is
emptied and handed to the next claim. Making and removing a folder for every
input costs more than converting a small one on file systems that are slow to
reuse freed inodes (ext4 without a journal skips every inode freed in the last
minute, one by one, on each file it creates). A folder found empty at start is
removed.

`.converted.json` spares a redo after a crash. It is written (durably) only when
a redo would not be idempotent (`on_conflict` `rename` or `fail`); with
`overwrite` the redo writes the same bytes under the same name. A crash between
the outputs' names and `.converted.json` is covered by `.committing.json`, written
by the conversion before it names its outputs: their inodes, by which a redo
recognises what it placed already (see `niftidrop.api.convert_file`).

Inputs leave the claim folder by `link()` + `unlink()`, never by `rename()`:
`link()` refuses to replace an existing name (archive and failed are never
overwritten), and it keeps the inode. It also keeps the inbox watch free of
move-out events. Where links are refused (archive or failed on another file
system) a copy is made under a temporary name and linked instead. Before the
link, `.moving.json` records the name chosen (and the copy's name and inode), so
a retry or a restart after any step finishes that move rather than making a
second one, without relying on link counts. A failed input is linked first, then
its `.error.json` is written; the record is kept in the claim folder until both
exist. Every file-system step is announced to `niftidrop.steps` (the seam of the
fault-injection tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import os
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

from niftidrop import __version__, names
from niftidrop.arrays import file_kind
from niftidrop.errors import ConfigError, ConversionError, ErrorCode
from niftidrop.names import is_owned_by, is_temp_name, temp_path_for
from niftidrop.settings import Settings
from niftidrop.steps import step
from niftidrop.watcher import is_candidate, scan_inbox
from niftidrop.writer import (
    NO_HARD_LINKS,
    copy_file,
    discard,
    fsync_folder,
    link_exclusive,
    link_unique,
    make_folders,
    write_json_atomic,
)

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
        return names.input_stem(self.relative.name)

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


class Spool:
    """The spool folders of one service and every move between them."""

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
        self.remember_conversions = settings.on_conflict != "overwrite"
        self._settings = settings  # its output settings decide the names outputs get
        self._known_limits: dict[Path, names.Limits] = {}
        # The records a claim folder may hold (no `.committing.json` with overwrite).
        self._markers = (MOVE_RECORD, CONVERTED_MARKER, FAILURE_MARKER) + (
            (COMMIT_RECORD,) if self.remember_conversions else ()
        )
        self._lock_file: IO[bytes] | None = None
        self._spare_folders: list[Path] = []
        self._spare_lock = threading.Lock()
        # Claim folder → summary of a conversion whose `.converted.json` could not be
        # written (a full state file system): kept for the retries of this process.
        self._unrecorded: dict[Path, dict[str, Any]] = {}

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

    # Claiming.

    def relative(self, path: Path) -> PurePosixPath:
        """`path` relative to the inbox; ValueError if it is outside or escapes it."""
        relative = PurePosixPath(path.relative_to(self.inbox).as_posix())
        if ".." in relative.parts or not relative.parts:
            raise ValueError(f"{path} is not inside the inbox {self.inbox}")
        return relative

    def claim(self, path: Path) -> Claim | None:
        """Move `path` out of the inbox by rename into a new claim; None if it is gone,
        or if a folder on its way is not a real folder of the inbox (a symlink).

        The rename works on folder descriptors opened one component at a time
        without following symlinks, so a subfolder swapped for a symlink at any
        moment can never lead it to a file outside the inbox, and paths longer
        than the system's limit are no obstacle. An input whose name cannot be
        carried through the spool is claimed under a name that fits, with its
        `bad_name` record already in the claim folder: `handle` moves it to failed.
        """
        relative = self.relative(path)
        folder = self._empty_folder()
        claimed, why = self._claimed_name(folder, relative)
        claim = Claim(folder, claimed)
        try:
            if why is not None:
                record = error_record(
                    Claim(folder, relative), ConversionError(ErrorCode.BAD_NAME, why)
                )
                self._write_record(folder / FAILURE_MARKER, record, "failure_record")
            links = self._move_in(relative, claim)
        except BaseException:
            self.release(claim)
            raise
        if links is None:
            self.release(claim)
            return None
        return dataclasses.replace(claim, links=links)

    def _move_in(self, relative: PurePosixPath, claim: Claim) -> int | None:
        """Rename the inbox's `relative` to `claim.path`; its link count, or None if it
        (or a real folder on its way) is not there."""
        with contextlib.ExitStack() as stack:
            try:
                source = stack.enter_context(_folder_descriptor(self.inbox, relative.parent))
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as error:
                if error.errno == errno.ELOOP:
                    return None  # a symlink in place of a subfolder is never followed
                raise
            target = stack.enter_context(
                _folder_descriptor(claim.folder, claim.subfolder, create=True)
            )
            try:
                step("claim_rename")
                os.rename(relative.name, claim.name, src_dir_fd=source, dst_dir_fd=target)
            except FileNotFoundError:
                return None
            return os.stat(claim.name, dir_fd=target, follow_symlinks=False).st_nlink
        raise AssertionError("unreachable")  # for mypy: ExitStack may swallow exceptions

    def _claimed_name(
        self, folder: Path, relative: PurePosixPath
    ) -> tuple[PurePosixPath, str | None]:
        """Where in the claim `folder` the input goes, and why its name cannot be
        carried through the spool (None when it can)."""
        why = names.problem(relative, self._destinations(folder, relative.name))
        if why is None:
            return relative, None
        stem, extension = names.split_name(relative.name)
        destinations = self._destinations(folder, relative.name, failing=True)
        short = names.shortened(stem, extension, names.room(relative.name, destinations))
        for subfolder in (relative.parent, PurePosixPath()):
            candidate = subfolder / short
            if not names.problem(candidate, self._destinations(folder, short, failing=True)):
                kept = "" if candidate == relative else f"; kept in failed as {candidate}"
                return candidate, f"{relative}: expected {why}{kept}"
        # Even the top of failed leaves no room: the record still names the input.
        return PurePosixPath(short), f"{relative}: expected {why}"

    def _destinations(
        self, folder: Path, name: str, *, failing: bool = False
    ) -> list[names.Destination]:
        """Every name the spool makes from an input `name` claimed into `folder`, by
        the folder it is made in (only those of failing it, with `failing`)."""
        temporary = names.temporary_name
        unique = names.suffixed(name, names.UNIQUE_ROOM)
        found = [
            names.Destination(folder, self._limits(self.state), (name,)),
            names.Destination(
                self.failed_folder,
                self._limits(self.failed_folder),
                (unique, temporary(unique + ERROR_SUFFIX)),
            ),
        ]
        if failing:
            return found
        if not self.delete_after_success:
            found.append(
                names.Destination(
                    self.archive_folder, self._limits(self.archive_folder), (temporary(unique),)
                )
            )
        found.append(names.Destination(self.outbox, self._limits(self.outbox), self._outputs(name)))
        return found

    def _outputs(self, name: str) -> tuple[str, ...]:
        """The temporary names of the longest outputs of input `name` (see api.convert_file)."""
        stem = names.input_stem(name)
        if self._settings.on_conflict == "rename":
            stem += names.UNIQUE_ROOM
        extension = ".nii.gz" if self._settings.compress else ".nii"
        channel = names.CHANNEL_ROOM if self._settings.channels == "split" else ""
        made = [f"{stem}{channel}{extension}"]
        if self._settings.sidecar:
            made.append(f"{stem}.json")
        return tuple(names.temporary_name(output) for output in made)

    def _limits(self, folder: Path) -> names.Limits:
        """The name limits of `folder`'s file system (asked once)."""
        limits = self._known_limits.get(folder)
        if limits is None:
            limits = self._known_limits[folder] = names.Limits.of(folder)
        return limits

    def _empty_folder(self) -> Path:
        """A token folder for a new claim: a spare one, or a new one."""
        with self._spare_lock:
            if self._spare_folders:
                return self._spare_folders.pop()
        return Path(tempfile.mkdtemp(prefix="", dir=self.claims_folder))

    def remove_spare_folders(self) -> None:
        """Remove the empty token folders kept for next claims (when the service stops)."""
        with self._spare_lock:
            spare, self._spare_folders = self._spare_folders, []
        for folder in spare:
            with contextlib.suppress(OSError):
                folder.rmdir()

    def claims(self) -> list[Claim]:
        """Every claim left in the state folder, oldest input first (crash recovery).

        Claim folders without an input (a crash before the rename, or after the
        input left) are removed, spare ones included: called at start, before
        any claim is made.
        """
        with self._spare_lock:
            self._spare_folders.clear()
        found: list[tuple[int, Claim]] = []
        try:
            folders = sorted(entry for entry in self.claims_folder.iterdir() if entry.is_dir())
        except FileNotFoundError:
            return []
        for folder in folders:
            try:
                claimed = self._claimed_input(folder)
            except OSError:
                continue  # unreadable now: neither finished nor removed; the next start looks
            if claimed is None:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            found.append((_mtime_ns(claimed), Claim(folder, self._relative_in(folder, claimed))))
        return [claim for _, claim in sorted(found, key=lambda item: item[0])]

    @staticmethod
    def _relative_in(folder: Path, claimed: Path) -> PurePosixPath:
        return PurePosixPath(claimed.relative_to(folder).as_posix())

    @staticmethod
    def _claimed_input(folder: Path) -> Path | None:
        """The input in claim `folder`: the first visible entry, at any depth, that is
        not a real folder (a claimed symlink or special file counts too); None if
        there is none. OSError when part of it cannot be read: then nothing tells
        that it is empty.

        A loop over folder descriptors, each opened from its parent's without
        following a symlink: any depth, any path length.
        """
        # (descriptor, its path in the claim, its subfolders still to visit)
        stack: list[tuple[int, PurePosixPath, list[str] | None]] = [
            (os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), PurePosixPath(), None)
        ]
        try:
            while stack:
                descriptor, relative, subfolders = stack[-1]
                if subfolders is None:
                    subfolders = []
                    with os.scandir(descriptor) as entries:
                        for entry in entries:
                            if entry.name.startswith("."):
                                continue
                            if not entry.is_dir(follow_symlinks=False):
                                return folder / relative / entry.name
                            subfolders.append(entry.name)
                    stack[-1] = (descriptor, relative, subfolders)
                if not subfolders:
                    stack.pop()
                    os.close(descriptor)
                    continue
                name = subfolders.pop()
                child = os.open(name, _FOLDER_FLAGS, dir_fd=descriptor)
                stack.append((child, relative / name, None))
            return None
        finally:
            for descriptor, _, _ in stack:
                os.close(descriptor)

    def _holds_input(self, folder: Path) -> bool:
        try:
            return self._claimed_input(folder) is not None
        except OSError:
            return False  # released meanwhile (the service is running)

    def release(self, claim: Claim) -> None:
        """Empty a claim's folder once its input has left, and keep it for a next claim."""
        if os.path.lexists(claim.path):
            raise AssertionError(f"{claim.path} is still claimed")
        self._unrecorded.pop(claim.folder, None)
        # The usual content is known (markers, then the relative folders): removing
        # it directly is much cheaper than rmtree's walk; rmtree handles the rest.
        try:
            step("release")
            for marker in self._markers:
                with contextlib.suppress(FileNotFoundError):
                    (claim.folder / marker).unlink()
            for folder in [claim.subfolder, *claim.subfolder.parents][:-1]:  # deepest first
                (claim.folder / folder).rmdir()
        except OSError:
            shutil.rmtree(claim.folder, ignore_errors=True)
            return
        with self._spare_lock:
            if len(self._spare_folders) < SPARE_FOLDERS:
                self._spare_folders.append(claim.folder)
                return
        with contextlib.suppress(OSError):  # left empty: the next start removes it
            claim.folder.rmdir()

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

    # Finishing a claim.

    def handle(self, claim: Claim, convert: Converter) -> Outcome | None:
        """Take a claim to its end: resume what a crash interrupted, or convert it.

        Returns None if the claimed input has vanished. Raises OSError for
        environmental trouble (the input stays claimed and can be handled again).
        """
        try:
            info = claim.path.lstat()
        except FileNotFoundError:
            # It left before a crash (or a failure) let the claim be released.
            self._drop_copy(claim, read_json(claim.folder / MOVE_RECORD))
            self.release(claim)
            return None
        resumed = self._resume(claim, info)
        if resumed is not None:
            return resumed
        record = read_json(claim.folder / FAILURE_MARKER)
        if record is not None:
            return self.fail(claim, record)
        summary = read_json(claim.folder / CONVERTED_MARKER) or self._unrecorded.get(claim.folder)
        if summary is None:
            if not stat.S_ISREG(info.st_mode):
                error = ConversionError(
                    ErrorCode.UNSAFE_INPUT,
                    f"{claim.relative}: expected a regular file, found a "
                    f"{file_kind(info.st_mode)}; it is not followed",
                )
                return self.fail(claim, error_record(claim, error))
            try:
                summary = convert(claim)
            except ConversionError as error:
                return self.fail(claim, error_record(claim, error))
            except BaseException:
                # A conversion process that was killed leaves its temporary files.
                self.discard_temporaries(claim)
                raise
            if self.remember_conversions:
                try:
                    self._write_record(claim.folder / CONVERTED_MARKER, summary, "converted_record")
                except OSError:
                    # The outputs have their names: a retry by this process must not
                    # convert again (which would add suffixed copies).
                    self._unrecorded[claim.folder] = summary
                    raise
        return self._finish_converted(claim, summary)

    def _finish_converted(self, claim: Claim, summary: dict[str, Any]) -> Converted:
        archived_as = None
        move: dict[str, Any] | None = None
        if not self.delete_after_success:
            move = {"to": ARCHIVE, "summary": summary}
            archived_as = self._move(claim, move)
        self._leave(claim, move)
        return Converted(claim, summary, archived_as)

    def fail(self, claim: Claim, record: dict[str, Any]) -> Failed:
        """Move the claimed input to failed together with its `.error.json`."""
        marker = claim.folder / FAILURE_MARKER
        if not marker.exists():
            self._write_record(marker, record, "failure_record")
        move: dict[str, Any] = {"to": FAILED}
        failed_as = self._move(claim, move, companion=ERROR_SUFFIX)
        self._write_error(failed_as, record)
        self._leave(claim, move)
        return Failed(claim, record, failed_as)

    def _write_error(self, failed_as: Path, record: Mapping[str, Any]) -> None:
        error_path = failed_as.with_name(failed_as.name + ERROR_SUFFIX)
        self._write_record(error_path, record, "error_record")

    def _write_record(
        self, path: Path, data: Mapping[str, Any], kind: str, *, durable: bool = True
    ) -> None:
        write_json_atomic(path, data, durable=durable and self.durable, owner=self.owner, kind=kind)

    def _destination(self, to: str) -> Path:
        return self.archive_folder if to == ARCHIVE else self.failed_folder

    def _move(self, claim: Claim, move: dict[str, Any], *, companion: str = "") -> Path:
        """Give the claimed input a free name in archive or failed (`move["to"]`), no
        file having that name nor `<name><companion>`; returns it.

        Before each try the claim's move record says which name (and which copy),
        so a retry or a restart finishes this move instead of making another
        (`_resume_move`), without relying on link counts. The input keeps its name
        in the claim folder until `_leave`.
        """
        folder = self._destination(move["to"]) / claim.subfolder
        make_folders(folder, fsync=self.durable)
        # A copy left by an earlier try may be partial: it is made again.
        self._drop_copy(claim, read_json(claim.folder / MOVE_RECORD))
        for candidate in names.unique_names(claim.name):
            target = folder / candidate
            if os.path.lexists(target) or (
                companion and os.path.lexists(folder / (candidate + companion))
            ):
                continue
            move["name"] = candidate
            # Not fsynced: it serves after a crash of the process (the page cache
            # keeps it); after a power cut that loses it, the link itself tells
            # (`_resume_linked`). The copy fallback, which no link count can
            # tell, records durably below.
            durable = "copy" in move
            self._write_record(claim.folder / MOVE_RECORD, move, "move_record", durable=durable)
            try:
                self._place(claim, target, move)
            except FileExistsError:
                continue  # taken meanwhile
            if self.durable:
                fsync_folder(folder)
            return target
        raise AssertionError("unreachable: unique_names never ends")

    def _place(self, claim: Claim, target: Path, move: dict[str, Any]) -> None:
        """Link the input (or, where links are refused, a copy of it) to `target`."""
        if "copy" not in move:
            try:
                step("input_link")
                os.link(claim.path, target, follow_symlinks=False)
                return
            except OSError as error:
                # Another file system, or no hard link allowed (protected_hardlinks
                # on someone else's file, file systems without links): link a copy.
                if error.errno not in NO_HARD_LINKS:
                    raise
            copy = temp_path_for(target.with_name(claim.name), self.owner_for(claim))
            move["copy"] = copy.name
            self._write_record(claim.folder / MOVE_RECORD, move, "move_record")
            # Recorded once complete: a copy without its inode in the record is redone.
            move["inode"] = copy_file(claim.path, copy, fsync=self.durable)
            self._write_record(claim.folder / MOVE_RECORD, move, "move_record")
        step("copy_link")
        os.link(target.with_name(move["copy"]), target, follow_symlinks=False)

    def _leave(self, claim: Claim, move: Mapping[str, Any] | None) -> None:
        """The input has its place in archive or failed (or is not kept): unlink its
        copy's temporary name (the record keeps the copy's inode), then its claimed
        name, and release the claim."""
        self._drop_copy(claim, move)
        step("input_unlink")
        claim.path.unlink()
        self.release(claim)

    def _drop_copy(self, claim: Claim, move: Mapping[str, Any] | None) -> None:
        copy = None if move is None else move.get("copy")
        if isinstance(copy, str) and is_owned_by(copy, self.owner_for(claim)):
            step("copy_unlink")
            discard(self._destination(move["to"]) / claim.subfolder / copy)  # type: ignore[index]

    def _resume(self, claim: Claim, info: os.stat_result) -> Outcome | None:
        """Finish a move to archive or failed that a crash or a failure interrupted."""
        move = read_json(claim.folder / MOVE_RECORD)
        if move is not None:
            return self._resume_move(claim, info, move)
        if info.st_nlink > max(1, claim.links):
            # A claim left by an earlier version, which kept no move record. Other
            # links alone (a producer's hard link) do not need the search of archive
            # and failed, which reads the whole folder.
            return self._resume_linked(claim, info)
        return None

    def _resume_move(
        self, claim: Claim, info: os.stat_result, move: Mapping[str, Any]
    ) -> Outcome | None:
        """Finish a recorded move if its name in archive or failed holds the input (or
        its recorded copy); None if the move had not happened."""
        to, name = move.get("to"), move.get("name")
        if to not in (ARCHIVE, FAILED) or not isinstance(name, str) or "/" in name:
            return None
        target = self._destination(to) / claim.subfolder / name
        try:
            found = target.lstat()
        except FileNotFoundError:
            return None  # other errors are raised: a guess could move the input twice
        inode = move.get("inode")
        if (found.st_dev, found.st_ino) != (info.st_dev, info.st_ino) and (
            not isinstance(inode, list) or (found.st_dev, found.st_ino) != tuple(inode)
        ):
            return None  # the name is someone else's
        if self.durable:
            fsync_folder(target.parent)
        if to == FAILED:
            record = read_json(claim.folder / FAILURE_MARKER) or {}
            if not os.path.lexists(target.with_name(name + ERROR_SUFFIX)):
                self._write_error(target, record)
            self._leave(claim, move)
            return Failed(claim, record, target)
        summary = move.get("summary")
        if not isinstance(summary, dict):
            summary = read_json(claim.folder / CONVERTED_MARKER) or {}
        self._leave(claim, move)
        return Converted(claim, summary, target)

    def _resume_linked(self, claim: Claim, info: os.stat_result) -> Outcome | None:
        """A claim of an earlier version, after a crash between link and unlink: finish
        the move that was under way."""
        for folder in (self.archive_folder, self.failed_folder):
            twin = _find_link(folder / claim.subfolder, claim.name, info)
            if twin is None:
                continue
            if folder == self.failed_folder:
                record = read_json(claim.folder / FAILURE_MARKER) or {}
                if not twin.with_name(twin.name + ERROR_SUFFIX).exists():
                    self._write_error(twin, record)
                self._leave(claim, None)
                return Failed(claim, record, twin)
            summary = read_json(claim.folder / CONVERTED_MARKER) or {}
            self._leave(claim, None)
            return Converted(claim, summary, twin)
        return None

    # Commands: retry, status, heartbeat.

    def failed_inputs(self) -> list[Path]:
        """Inputs in failed (their `.error.json` files excluded)."""
        return sorted(
            Path(root) / name
            for root, _, files in os.walk(self.failed_folder)
            for name in files
            if not name.startswith(".") and not name.endswith(ERROR_SUFFIX)
        )

    def retry(self, names: Sequence[str] = ()) -> list[Path]:
        """Move failed inputs (all, or those whose name or relative path is in `names`)
        back into the inbox under their original relative path; removes their
        `.error.json`. Returns the inbox paths."""
        moved = []
        for failed_input in self.failed_inputs():
            relative = PurePosixPath(failed_input.relative_to(self.failed_folder).as_posix())
            if names and failed_input.name not in names and str(relative) not in names:
                continue
            error_path = failed_input.with_name(failed_input.name + ERROR_SUFFIX)
            original = (read_json(error_path) or {}).get("input")
            if isinstance(original, str) and _is_safe_relative(original):
                relative = PurePosixPath(original)
            target = link_unique(
                failed_input, self.inbox / relative.parent, name=relative.name, fsync=self.durable
            )
            failed_input.unlink()
            with contextlib.suppress(FileNotFoundError):
                error_path.unlink()
            moved.append(target)
        return moved

    def counts(self) -> dict[str, int]:
        """How many files each folder holds (inputs, outputs, claims)."""
        return {
            "inbox": sum(1 for _ in scan_inbox(self.inbox, recursive=self.recursive)),
            # Counted, not listed: `claims()` tidies up, which is the service's business.
            CLAIMS: sum(self._holds_input(folder) for folder in _folders(self.claims_folder)),
            "outbox": _count_files(self.outbox, lambda name: not name.endswith(".json")),
            "archive": _count_files(self.archive_folder, is_candidate),
            "failed": len(self.failed_inputs()),
        }

    def write_heartbeat(self, details: Mapping[str, Any]) -> None:
        """Replace the heartbeat file (atomically: readers never see half of it)."""
        write_json_atomic(
            self.heartbeat_path,
            {"time": now_iso(), **details},
            durable=False,
            owner=self.owner,
            kind="heartbeat",
        )

    def heartbeat_age(self, now: float) -> float | None:
        """Seconds since the last heartbeat, or None if there is none."""
        try:
            return now - self.heartbeat_path.stat().st_mtime
        except OSError:
            return None


# Folders on the way to a claimed input are opened like this: never through a symlink.
_FOLDER_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def _folder_descriptor(
    base: Path, relative: PurePosixPath, *, create: bool = False
) -> Iterator[int]:
    """A descriptor of `base/relative`, walked down from `base` one folder at a time
    without following a symlink (ELOOP), so what it names cannot change under it;
    `create`: make missing folders on the way."""
    descriptor = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in relative.parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=descriptor)
            child = os.open(part, _FOLDER_FLAGS, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = child
        yield descriptor
    finally:
        os.close(descriptor)


def _find_link(folder: Path, name: str, info: os.stat_result) -> Path | None:
    """The file in `folder` named like `name` (see `unique_names`) that is `info`'s inode."""
    stem, extension = names.split_name(name, names.KNOWN_EXTENSIONS)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return None
    for entry in entries:
        family = entry.name == name or (
            entry.name.startswith(stem + "-") and entry.name.endswith(extension)
        )
        if not family:
            continue
        found = entry.stat(follow_symlinks=False)
        if (found.st_dev, found.st_ino) == (info.st_dev, info.st_ino):
            return Path(entry.path)
    return None


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


def _is_safe_relative(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts


def _folders(folder: Path) -> list[Path]:
    try:
        return [Path(entry) for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _count_files(folder: Path, accept: Callable[[str], bool]) -> int:
    return sum(
        1
        for _, _, files in os.walk(folder)
        for name in files
        if not name.startswith(".") and accept(name)
    )


def _mtime_ns(path: Path) -> int:
    try:
        return path.lstat().st_mtime_ns
    except OSError:
        return 0  # first in line: the claim is handled, and its trouble shows then
