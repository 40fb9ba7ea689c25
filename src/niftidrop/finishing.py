"""Finishing a claim: its input moved to archive or failed, or resumed after a crash
(README: File protocol).

Inputs leave the claim folder by `link()` + `unlink()`, never by `rename()`, and
`.moving.json` records the name chosen (and a copy's name and inode) before the
link, so a retry or a restart finishes that move rather than making a second
one (see `niftidrop.spool`).
"""

from __future__ import annotations

import errno
import filecmp
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from niftidrop import names
from niftidrop.arrays import file_kind
from niftidrop.claiming import Claimer, ClaimLost
from niftidrop.claims import (
    ARCHIVE,
    CONVERTED_MARKER,
    ERROR_SUFFIX,
    FAILED,
    FAILURE_MARKER,
    MOVE_RECORD,
    Claim,
    Converted,
    Converter,
    Failed,
    Outcome,
    error_record,
)
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.events import EventStore
from niftidrop.names import is_owned_by, temp_path_for
from niftidrop.settings import Settings
from niftidrop.steps import step
from niftidrop.writer import (
    NO_HARD_LINKS,
    copy_file,
    discard,
    fsync_folder,
    link_exclusive,
    make_folders,
)

Finish = TypeVar("Finish", Converted, Failed)


class Finisher(Claimer):
    """Claims taken to their end: converted and archived (or deleted), or failed with
    their `.error.json`; moves a crash interrupted are finished."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # The hand-off's events (None without hooks), recorded before a move is final.
        self.events = EventStore.of(self, settings)

    def handle(self, claim: Claim, convert: Converter) -> Outcome | None:
        """Take a claim to its end: resume what a crash interrupted, or convert it.

        Returns None if the claimed input has vanished. Raises ClaimLost if its claim
        folder has (another instance adopted it), OSError for environmental trouble
        (the input stays claimed and can be handled again).
        """
        try:
            info = claim.path.lstat()
        except FileNotFoundError:
            if not os.path.lexists(claim.folder):
                raise ClaimLost(claim) from None  # adopted while this instance was paused
            # It left before a crash (or a failure) let the claim be released.
            self._drop_copy(claim, self._record(claim, MOVE_RECORD))
            self.release(claim)
            return None
        resumed = self._resume(claim, info)
        if resumed is not None:
            return resumed
        record = self._record(claim, FAILURE_MARKER)
        if record is not None:
            return self.fail(claim, record)
        summary = self._record(claim, CONVERTED_MARKER) or self._unrecorded.get(claim.folder)
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
        return self._leave(claim, move, Converted(claim, summary, archived_as))

    def fail(self, claim: Claim, record: dict[str, Any]) -> Failed:
        """Move the claimed input to failed together with its `.error.json`."""
        marker = claim.folder / FAILURE_MARKER
        if not marker.exists():
            self._write_record(marker, record, "failure_record")
        move: dict[str, Any] = {"to": FAILED}
        failed_as = self._move(claim, move, companion=ERROR_SUFFIX)
        self._write_error(failed_as, record)
        return self._leave(claim, move, Failed(claim, record, failed_as))

    def _write_error(self, failed_as: Path, record: Mapping[str, Any]) -> None:
        error_path = failed_as.with_name(failed_as.name + ERROR_SUFFIX)
        # Indented: people read it, beside the failed input.
        self._write_record(error_path, record, "error_record", indent=2)

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
        self._drop_copy(claim, self._record(claim, MOVE_RECORD))
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
        # Where no file may have two names, the copy is renamed to `target` instead:
        # it keeps the inode the record names, which is how a redo recognises it.
        if not link_exclusive(target.with_name(move["copy"]), target):
            raise FileExistsError(errno.EEXIST, "taken meanwhile", str(target))

    def _leave(self, claim: Claim, move: Mapping[str, Any] | None, outcome: Finish) -> Finish:
        """The input has its place in archive or failed (or is not kept): unlink its
        copy's temporary name (the record keeps the copy's inode), record its event,
        then unlink its claimed name and release the claim; returns `outcome`."""
        self._drop_copy(claim, move)
        if self.events is not None:
            self.events.record(outcome)  # before the move is final: at least once
        step("input_unlink")
        claim.path.unlink()
        self.release(claim)
        if self.events is not None:
            self.events.released(claim)
        return outcome

    def _drop_copy(self, claim: Claim, move: Mapping[str, Any] | None) -> None:
        copy = None if move is None else move.get("copy")
        if isinstance(copy, str) and is_owned_by(copy, self.owner_for(claim)):
            step("copy_unlink")
            discard(self._destination(move["to"]) / claim.subfolder / copy)  # type: ignore[index]

    def _resume(self, claim: Claim, info: os.stat_result) -> Outcome | None:
        """Finish a move to archive or failed that a crash or a failure interrupted."""
        move = self._record(claim, MOVE_RECORD)
        if move is not None:
            resumed = self._resume_move(claim, info, move)
            if resumed is not None or claim.links:
                return resumed
        if not claim.links or info.st_nlink > claim.links:
            # A claim this process did not take (found at start, or adopted), or one
            # with more links than when it was taken: the search of archive and
            # failed, which reads the whole folder. An adopted claim's move record
            # and link count come from another client of a shared file system, whose
            # caches may not show them yet; an earlier version kept no move record.
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
        if (
            (found.st_dev, found.st_ino) != (info.st_dev, info.st_ino)
            and (not isinstance(inode, list) or (found.st_dev, found.st_ino) != tuple(inode))
            and not _same_link(found, info, target, claim.path)
        ):
            return None  # the name is someone else's
        if self.durable:
            fsync_folder(target.parent)
        if to == FAILED:
            record = self._record(claim, FAILURE_MARKER) or {}
            if not os.path.lexists(target.with_name(name + ERROR_SUFFIX)):
                self._write_error(target, record)
            return self._leave(claim, move, Failed(claim, record, target))
        summary = move.get("summary")
        if not isinstance(summary, dict):
            summary = self._record(claim, CONVERTED_MARKER) or {}
        return self._leave(claim, move, Converted(claim, summary, target))

    def _resume_linked(self, claim: Claim, info: os.stat_result) -> Outcome | None:
        """A claim of an earlier version, after a crash between link and unlink: finish
        the move that was under way."""
        for folder in (self.archive_folder, self.failed_folder):
            twin = _find_link(folder / claim.subfolder, claim.name, info)
            if twin is None:
                continue
            if folder == self.failed_folder:
                record = self._record(claim, FAILURE_MARKER) or {}
                if not twin.with_name(twin.name + ERROR_SUFFIX).exists():
                    self._write_error(twin, record)
                return self._leave(claim, None, Failed(claim, record, twin))
            summary = self._record(claim, CONVERTED_MARKER) or {}
            return self._leave(claim, None, Converted(claim, summary, twin))
        return None


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


def _same_link(found: os.stat_result, info: os.stat_result, target: Path, path: Path) -> bool:
    """Whether `target` is another link to the input at `path` where the file system
    numbers each path's inode itself (sshfs without `use_ino`): same size, same
    modification time (kept by the file, not the name) and the same bytes."""
    if not stat.S_ISREG(found.st_mode) or not stat.S_ISREG(info.st_mode):
        return False
    if (found.st_size, found.st_mtime_ns) != (info.st_size, info.st_mtime_ns):
        return False
    try:
        return filecmp.cmp(target, path, shallow=False)
    except FileNotFoundError:
        return False
