"""Claiming: inputs taken out of the inbox into claim folders (README: File protocol).

Each claim has a token folder to itself, made atomically by `mkdtemp` and reused
once its input has left (see `niftidrop.spool`). An input is renamed into its
claim through folder descriptors opened one component at a time without
following symlinks; a name that cannot be carried through the spool is claimed
under one that fits, with its `bad_name` record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import secrets
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Final

from niftidrop import names
from niftidrop.claims import (
    CLAIMS,
    COMMIT_RECORD,
    CONVERTED_MARKER,
    ERROR_SUFFIX,
    FAILURE_MARKER,
    MOVE_RECORD,
    SPARE_FOLDERS,
    Claim,
    SpoolFolders,
    error_record,
)
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.instances import INSTANCES
from niftidrop.profiles import Profiles
from niftidrop.settings import Settings
from niftidrop.steps import step

# The name under which `claim_adopted` reports the claims of an earlier version.
EARLIER_VERSION: Final = "(earlier version)"


class ClaimLost(Exception):
    """The claim's folder is gone: another instance adopted it while this one was
    paused past its lease. This instance drops the claim and touches nothing of it."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(f"{claim.relative}: its claim was adopted by another instance")
        self.claim = claim


class Claimer(SpoolFolders):
    """Claims: inputs moved into claim folders, the claims found at start, and the
    release of a claim folder once its input has left."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._known_limits: dict[Path, names.Limits] = {}
        self._profiles = Profiles(settings)  # its inputs' outputs are named by their profile
        # The records a claim folder may hold (no `.committing.json` with overwrite).
        self._markers = (MOVE_RECORD, CONVERTED_MARKER, FAILURE_MARKER) + (
            (COMMIT_RECORD,) if self.remember_conversions else ()
        )
        self._spare_folders: list[Path] = []
        self._spare_lock = threading.Lock()
        # Claim folder → summary of a conversion whose `.converted.json` could not be
        # written (a full state file system): kept for the retries of this process.
        self._unrecorded: dict[Path, dict[str, Any]] = {}

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
        made = self._destinations(folder, relative.name, relative=str(relative))
        why = names.problem(relative, made)
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
        self, folder: Path, name: str, *, failing: bool = False, relative: str = ""
    ) -> list[names.Destination]:
        """Every name the spool makes from an input `name` claimed into `folder`, by
        the folder it is made in (only those of failing it, with `failing`); the
        outputs as the profile of the input's `relative` path names them."""
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
        found.append(
            names.Destination(self.outbox, self._limits(self.outbox), self._outputs(name, relative))
        )
        return found

    def _outputs(self, name: str, relative: str) -> tuple[str, ...]:
        """The temporary names of the longest outputs of input `name` (see
        api.convert_file), made by the settings of its `relative` path's profile."""
        settings = self._profiles.choose(relative)[1]
        stem = names.input_stem(name)
        if settings.on_conflict == "rename":
            stem += names.UNIQUE_ROOM
        extension = ".nii.gz" if settings.compress else ".nii"
        channel = names.CHANNEL_ROOM if settings.channels == "split" else ""
        made = [f"{stem}{channel}{extension}"]
        if settings.sidecar:
            made.append(f"{stem}.json")
        return tuple(names.temporary_name(output) for output in made)

    def _limits(self, folder: Path) -> names.Limits:
        """The name limits of `folder`'s file system (asked once)."""
        limits = self._known_limits.get(folder)
        if limits is None:
            limits = self._known_limits[folder] = names.Limits.of(folder)
        return limits

    def _empty_folder(self) -> Path:
        """A token folder for a new claim, a spare one or a new one: it holds no record."""
        with self._spare_lock:
            folder = self._spare_folders.pop() if self._spare_folders else None
        folder = folder or Path(tempfile.mkdtemp(prefix="", dir=self.claims_folder))
        self._written[folder] = set()
        return folder

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
        self._written.clear()
        found: list[tuple[int, Claim]] = []
        try:
            folders = sorted(entry for entry in self.claims_folder.iterdir() if entry.is_dir())
        except FileNotFoundError:
            return []
        for folder in folders:
            try:
                claimed = claimed_input(folder)
            except OSError:
                continue  # unreadable now: neither finished nor removed; the next start looks
            if claimed is None:
                _remove_if_empty(folder)
                continue
            found.append((_mtime_ns(claimed), Claim(folder, _relative_in(folder, claimed))))
        return [claim for _, claim in sorted(found, key=lambda item: item[0])]

    def adopt(self, expired: list[tuple[str, str]] | None = None) -> list[tuple[str, list[Claim]]]:
        """Take over the claims of every other instance whose lease has expired, and
        those an earlier version left: (instance, the claims now this one's), for
        each instance something was adopted from. Their empty claim folders are
        removed (by `rmdir` only). `expired`: `expired_instances()`, when already known."""
        if expired is None:
            expired = self.expired_instances()
        sources = [(name, self.state / INSTANCES / name / CLAIMS) for name, _ in expired]
        sources.append((EARLIER_VERSION, self.legacy_claims_folder))
        adopted = []
        for name, folder in sources:
            claims = [claim for claim in map(self._adopt_one, _folders_in(folder)) if claim]
            if claims:
                adopted.append((name, claims))
        return adopted

    def _adopt_one(self, folder: Path) -> Claim | None:
        """Rename the claim `folder` of a dead instance into this instance's claims
        folder; None if it holds no input (then it is removed if still empty) or
        another instance adopted it first."""
        try:
            claimed = claimed_input(folder)
        except OSError:
            return None  # gone meanwhile, or unreadable: nothing is known of it
        if claimed is None:
            _remove_if_empty(folder)
            return None
        relative = _relative_in(folder, claimed)
        self.claims_folder.mkdir(parents=True, exist_ok=True)
        target = self.claims_folder / folder.name
        if os.path.lexists(target):  # token names are per instance: two may meet
            target = self.claims_folder / f"{folder.name}-{secrets.token_hex(4)}"
        try:
            step("adopt_rename")
            folder.rename(target)
        except FileNotFoundError:
            return None  # another instance adopted it first
        self._written.pop(target, None)  # it may hold any record: all are looked for
        return Claim(target, relative)

    def release(self, claim: Claim) -> None:
        """Empty a claim's folder once its input has left, and keep it for a next claim."""
        if os.path.lexists(claim.path):
            raise AssertionError(f"{claim.path} is still claimed")
        self._unrecorded.pop(claim.folder, None)
        # The usual content is known (markers, then the relative folders): removing
        # it directly is much cheaper than a walk; `_remove_if_empty` walks the rest.
        try:
            step("release")
            for marker in self._markers:
                if self._may_hold(claim, marker):
                    with contextlib.suppress(FileNotFoundError):
                        (claim.folder / marker).unlink()
            for folder in [claim.subfolder, *claim.subfolder.parents][:-1]:  # deepest first
                (claim.folder / folder).rmdir()
        except OSError:
            _remove_if_empty(claim.folder)
            return
        finally:
            self._written.pop(claim.folder, None)
        with self._spare_lock:
            if len(self._spare_folders) < SPARE_FOLDERS:
                self._spare_folders.append(claim.folder)
                return
        with contextlib.suppress(OSError):  # left empty: the next start removes it
            claim.folder.rmdir()


def holds_input(folder: Path) -> bool:
    """Whether the claim `folder` holds an input (False if it is gone or unreadable)."""
    try:
        return claimed_input(folder) is not None
    except OSError:
        return False  # released meanwhile (the service is running)


def _relative_in(folder: Path, claimed: Path) -> PurePosixPath:
    return PurePosixPath(claimed.relative_to(folder).as_posix())


def _folders_in(folder: Path) -> list[Path]:
    """The subfolders of `folder`, by name (none if it is missing)."""
    try:
        entries = [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(entries)


def _remove_if_empty(folder: Path) -> None:
    """Remove the claim `folder` if it holds no input: its records (hidden files)
    are unlinked and its folders removed by `rmdir`, deepest first. A visible file
    is never removed: one an instance renames in meanwhile keeps the folder."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            if name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    (Path(root) / name).unlink()
        with contextlib.suppress(OSError):
            Path(root).rmdir()


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


def claimed_input(folder: Path) -> Path | None:
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


def _mtime_ns(path: Path) -> int:
    try:
        return path.lstat().st_mtime_ns
    except OSError:
        return 0  # first in line: the claim is handled, and its trouble shows then
