"""Tests of finishing a claim: archive, failed, transient faults, crash recovery (README:
File protocol, Error codes)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from niftidrop.claims import (
    CONVERTED_MARKER,
    FAILURE_MARKER,
    MOVE_RECORD,
    Claim,
    Converted,
    Failed,
    error_record,
)
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.names import temp_path_for
from niftidrop.settings import Settings, load_settings
from niftidrop.spool import Spool
from niftidrop.steps import hooked
from spools import (
    CLAIMS_FOLDER,
    Recorder,
    converted,
    drop,
    fail_once,
    files_under,
    refuse_links_from_claims,
    rejected,
)

# The files opened and removed while `file_calls` is active, as the interpreter's
# audit events report them ("open" for `open` and `os.open`, "os.remove" for unlinks).
_calls: list[tuple[str, Path]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _calls is not None and event in ("open", "os.remove") and isinstance(args[0], str | Path):
        _calls.append((event, Path(args[0])))


sys.addaudithook(_audit)


@contextmanager
def file_calls() -> Iterator[list[tuple[str, Path]]]:
    global _calls  # noqa: PLW0603 - the audit hook is process-wide and cannot be removed
    _calls = []
    try:
        yield _calls
    finally:
        _calls = None


class TestFinish:
    def test_converted_input_is_archived(self, spool: Spool) -> None:
        """A converted input lands in archive under its relative path; the claim is gone."""
        claim = spool.claim(drop(spool, "site/a.npy"))
        assert claim is not None
        outcome = spool.handle(claim, converted)
        assert isinstance(outcome, Converted)
        assert files_under(spool.archive_folder) == ["site/a.npy"]
        assert files_under(spool.claims_folder) == []
        assert [path.name for path in spool.claims_folder.iterdir()] == [claim.folder.name]

    def test_a_claim_of_this_process_is_finished_without_looking_for_other_records(
        self, spool: Spool
    ) -> None:
        """A claim this process took into an empty folder holds only the records it
        wrote since: the others are neither read nor unlinked (a system call each)."""
        for name in ("a.npy", "b.npy"):  # b's folder is a's, emptied and kept
            claim = spool.claim(drop(spool, name))
            assert claim is not None
            with file_calls() as calls:
                assert isinstance(spool.handle(claim, converted), Converted)
            in_claim = [(event, path.name) for event, path in calls if path.parent == claim.folder]
            assert [e for e in in_claim if e[1] in (CONVERTED_MARKER, FAILURE_MARKER)] == []
            assert ("open", MOVE_RECORD) not in in_claim  # written under a temporary name
            assert ("os.remove", MOVE_RECORD) in in_claim
            assert files_under(spool.archive_folder)[-1] == name

    def test_archive_never_overwrites(self, spool: Spool) -> None:
        """A taken name in archive gets a unique suffix before the extension."""
        for content in (b"one", b"two", b"three"):
            claim = spool.claim(drop(spool, "a.npy", content))
            assert claim is not None
            spool.handle(claim, converted)
        assert files_under(spool.archive_folder) == ["a-1.npy", "a-2.npy", "a.npy"]
        assert (spool.archive_folder / "a.npy").read_bytes() == b"one"

    def test_archive_copies_when_links_are_refused(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without hard links (EXDEV, EPERM) the input is copied, still never overwriting."""
        real_link = os.link
        refused = {"count": 0}

        def refuse_claims(source: Any, target: Any, **kwargs: Any) -> None:
            if CLAIMS_FOLDER in str(source):
                refused["count"] += 1
                raise PermissionError(1, "Operation not permitted")
            real_link(source, target, **kwargs)

        monkeypatch.setattr(os, "link", refuse_claims)
        for content in (b"one", b"two"):
            claim = spool.claim(drop(spool, "a.npy", content))
            assert claim is not None
            assert isinstance(spool.handle(claim, converted), Converted)
        assert refused["count"] == 2  # one refusal per input: the copy is linked after it
        assert files_under(spool.archive_folder) == ["a-1.npy", "a.npy"]
        assert (spool.archive_folder / "a-1.npy").read_bytes() == b"two"
        assert spool.claims() == []

    def test_delete_after_success(self, tmp_path: Path) -> None:
        """after_success = delete removes the input instead of archiving it."""
        spool = Spool(load_settings(root=tmp_path, after_success="delete", fsync=False))
        spool.create_folders()
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        spool.handle(claim, converted)
        assert files_under(spool.archive_folder) == []
        assert files_under(spool.claims_folder) == []

    def test_rejected_input_goes_to_failed_with_its_error_file(self, spool: Spool) -> None:
        """A ConversionError puts the input and <name>.error.json in failed (README:
        Error codes)."""
        claim = spool.claim(drop(spool, "site/a.npy"))
        assert claim is not None
        outcome = spool.handle(claim, rejected)
        assert isinstance(outcome, Failed)
        assert files_under(spool.failed_folder) == ["site/a.npy", "site/a.npy.error.json"]
        text = (spool.failed_folder / "site/a.npy.error.json").read_text()
        assert text.startswith('{\n  "input": ')  # indented: people read it
        record = json.loads(text)
        assert record["input"] == "site/a.npy"
        assert record["error"] == "shape_mismatch"
        assert "expected" in record["message"]
        assert record["failed_at"].endswith("Z")
        assert "niftidrop_version" in record

    def test_failed_names_are_unique_for_input_and_error_file(self, spool: Spool) -> None:
        """A second failure of the same name never overwrites the first or its record."""
        for _ in range(2):
            claim = spool.claim(drop(spool, "a.npy"))
            assert claim is not None
            spool.handle(claim, rejected)
        assert files_under(spool.failed_folder) == [
            "a-1.npy",
            "a-1.npy.error.json",
            "a.npy",
            "a.npy.error.json",
        ]

    def test_error_record_carries_reference_and_candidates(self, spool: Spool) -> None:
        """.error.json shows the reference and the candidates of the exception."""
        claim = Claim(spool.claims_folder / "x", PurePosixPath("a.npy"))
        error = ConversionError(
            ErrorCode.AMBIGUOUS_REFERENCE,
            "a.npy: two",
            reference=Path("/lib/a.nii"),
            candidates=[Path("/lib/a.nii"), Path("/lib2/a.nii")],
        )
        record = error_record(claim, error)
        assert record["reference"] == "/lib/a.nii"
        assert record["candidates"] == ["/lib/a.nii", "/lib2/a.nii"]

    def test_symlink_is_refused_without_being_followed(self, spool: Spool, tmp_path: Path) -> None:
        """A symlink fails as unsafe_input; its target is neither read nor moved."""
        target = tmp_path / "secret.npy"
        target.write_bytes(b"secret")
        (spool.inbox / "link.npy").symlink_to(target)
        claim = spool.claim(spool.inbox / "link.npy")
        assert claim is not None
        outcome = spool.handle(claim, converted)
        assert isinstance(outcome, Failed)
        assert outcome.record["error"] == "unsafe_input"
        assert (spool.failed_folder / "link.npy").is_symlink()
        assert target.read_bytes() == b"secret"

    def test_environmental_error_keeps_the_input_claimed(self, spool: Spool) -> None:
        """An OSError from the conversion propagates and the input stays claimed."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None

        def full_disk(claim: Claim) -> dict[str, Any]:
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="space"):
            spool.handle(claim, full_disk)
        assert claim.path.exists()
        assert files_under(spool.failed_folder) == []


def temporaries(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*.tmp")]


class TestTransientFaults:
    """A failed step leaves a state that the next try finishes, once, without leftovers."""

    def test_a_full_disk_leaves_no_record_temporaries(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Records that cannot be fsynced (a full disk) leave no .tmp behind."""
        spool = Spool(load_settings(root=tmp_path, fsync=True))
        spool.create_folders()
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None

        def full(descriptor: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        for _ in range(3):
            with pytest.raises(OSError, match="No space"):
                spool.handle(claim, rejected)
        assert temporaries(tmp_path) == []
        monkeypatch.undo()
        assert isinstance(spool.handle(claim, rejected), Failed)
        assert files_under(spool.failed_folder) == ["a.npy", "a.npy.error.json"]

    def test_the_converted_record_is_fsynced(self, tmp_path: Path) -> None:
        """With rename, `.converted.json` is durable before the input moves on."""
        spool = Spool(load_settings(root=tmp_path, fsync=True, on_conflict="rename"))
        spool.create_folders()
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        taken: list[str] = []
        with hooked(taken.append):
            spool.handle(claim, converted)
        assert "converted_record_fsync" in taken
        assert taken.index("converted_record_commit") < taken.index("input_link")

    def test_copied_into_failed_then_the_error_file_fails_once(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Failed on another file system, `.error.json` failing once: failed holds the
        input once, with its record, and no partial copy."""
        refuse_links_from_claims(monkeypatch)
        fail_once(monkeypatch, "replace", lambda path: ".error.json" in path.name)
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        with pytest.raises(OSError, match="Input/output"):
            spool.handle(claim, rejected)
        assert isinstance(spool.handle(claim, rejected), Failed)
        assert files_under(spool.failed_folder) == ["a.npy", "a.npy.error.json"]
        assert temporaries(spool.failed_folder) == []
        assert spool.claims() == []

    def test_copied_into_archive_then_the_unlink_fails_once(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Archive on another file system, the claimed input's unlink failing once (or a
        restart after it): the input is archived once."""
        refuse_links_from_claims(monkeypatch)
        for restart in (False, True):
            claim = spool.claim(drop(spool, f"{restart}.npy"))
            assert claim is not None
            fail_once(monkeypatch, "unlink", lambda path, claim=claim: path == claim.path)
            with pytest.raises(OSError, match="Input/output"):
                spool.handle(claim, converted)
            if restart:
                (claim,) = spool.claims()
            assert isinstance(spool.handle(claim, converted), Converted)
        assert files_under(spool.archive_folder) == ["False.npy", "True.npy"]
        assert temporaries(spool.archive_folder) == []

    def test_a_failed_copy_leaves_no_partial_copy(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A copy that fails half-way (a full archive) is removed, and redone next time."""
        refuse_links_from_claims(monkeypatch)
        claim = spool.claim(drop(spool, "a.npy", b"x" * 100_000))
        assert claim is not None

        def full(name: str) -> None:
            if name == "copy_write":
                raise OSError(28, "No space left on device")

        with hooked(full), pytest.raises(OSError, match="No space"):
            spool.handle(claim, converted)
        assert list(spool.archive_folder.rglob("*")) == []
        assert isinstance(spool.handle(claim, converted), Converted)
        assert (spool.archive_folder / "a.npy").read_bytes() == b"x" * 100_000

    def test_a_dead_conversion_s_temporaries_go_with_it(self, spool: Spool) -> None:
        """A conversion that dies (its process killed) has its outbox temporaries removed;
        another claim's stay."""
        claim = spool.claim(drop(spool, "site/a.npy"))
        other = spool.claim(drop(spool, "site/b.npy"))
        assert claim is not None
        assert other is not None
        theirs = temp_path_for(spool.outbox / "site" / "b.nii.gz", spool.owner_for(other))

        def killed(claim: Claim) -> dict[str, Any]:
            theirs.parent.mkdir(parents=True, exist_ok=True)
            theirs.write_bytes(b"in flight")
            mine = temp_path_for(spool.outbox / "site" / "a.nii.gz", spool.owner_for(claim))
            mine.write_bytes(b"half")
            raise ChildProcessError("conversion process 1234 ended (killed by SIGKILL)")

        with pytest.raises(ChildProcessError):
            spool.handle(claim, killed)
        assert [path.name for path in (spool.outbox / "site").iterdir()] == [theirs.name]


class TestRecovery:
    """Each test stops the protocol at one crash point and checks the next start."""

    def test_linked_into_archive_but_not_unlinked(self, spool: Spool, settings: Settings) -> None:
        """A crash between link and unlink finishes as converted, without a duplicate."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        (claim.folder / CONVERTED_MARKER).write_text('{"input": "a.npy"}')
        spool = Spool(settings)  # the next start: it knows none of these records
        os.link(claim.path, spool.archive_folder / "a.npy")
        calls = Recorder()
        outcome = spool.handle(claim, calls)
        assert isinstance(outcome, Converted)
        assert calls.names == []
        assert files_under(spool.archive_folder) == ["a.npy"]
        assert spool.claims() == []

    def test_a_recorded_link_is_known_without_its_inode_number(
        self, spool: Spool, settings: Settings
    ) -> None:
        """Where each path gets its own inode number (sshfs), a recorded move whose
        name holds the input's bytes and times is finished, not made twice."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        (claim.folder / CONVERTED_MARKER).write_text('{"input": "a.npy"}')
        (claim.folder / MOVE_RECORD).write_text('{"to": "archive", "name": "a.npy"}')
        spool = Spool(settings)  # the next start: it knows none of these records
        shutil.copy2(claim.path, spool.archive_folder / "a.npy")  # same bytes, other inode
        calls = Recorder()
        assert isinstance(spool.handle(claim, calls), Converted)
        assert calls.names == []
        assert files_under(spool.archive_folder) == ["a.npy"]

    def test_a_claim_found_at_start_is_looked_for_past_its_record(
        self, spool: Spool, settings: Settings
    ) -> None:
        """A claim this process did not take (found at start, or adopted from another
        client of a shared file system, whose caches may still show an older move
        record or link count) is looked for in archive by inode when its record does
        not lead there: it is finished, not converted and archived a second time."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        (claim.folder / CONVERTED_MARKER).write_text('{"input": "a.npy"}')
        (claim.folder / MOVE_RECORD).write_text('{"to": "archive", "name": "a-1.npy"}')
        spool = Spool(settings)  # the next start: it knows none of these records
        os.link(claim.path, spool.archive_folder / "a.npy")
        (found,) = spool.claims()
        assert found.links == 0
        calls = Recorder()
        assert isinstance(spool.handle(found, calls), Converted)
        assert calls.names == []
        assert files_under(spool.archive_folder) == ["a.npy"]
        assert spool.claims() == []

    @pytest.mark.parametrize("differs", ["bytes", "time"])
    def test_a_recorded_name_holding_another_file_is_not_taken(
        self, spool: Spool, settings: Settings, differs: str
    ) -> None:
        """The recorded name holds someone else's file (other bytes, or the same bytes
        written at another time): the input gets a name of its own."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        (claim.folder / CONVERTED_MARKER).write_text('{"input": "a.npy"}')
        (claim.folder / MOVE_RECORD).write_text('{"to": "archive", "name": "a.npy"}')
        spool = Spool(settings)  # the next start: it knows none of these records
        theirs = spool.archive_folder / "a.npy"
        shutil.copy2(claim.path, theirs)
        if differs == "bytes":
            data = bytearray(theirs.read_bytes())
            data[-1] ^= 1
            theirs.write_bytes(bytes(data))
            shutil.copystat(claim.path, theirs)
        else:
            os.utime(theirs, ns=(0, theirs.stat().st_mtime_ns - 1_000_000_000))
        assert isinstance(spool.handle(claim, Recorder()), Converted)
        assert files_under(spool.archive_folder) == ["a-1.npy", "a.npy"]
        assert (spool.archive_folder / "a-1.npy").read_bytes() == b"data"

    def test_linked_into_failed_before_the_error_file(
        self, spool: Spool, settings: Settings
    ) -> None:
        """A crash after the failed link writes the missing .error.json from the claim."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        record = {"input": "a.npy", "error": "corrupt", "message": "bad"}
        (claim.folder / FAILURE_MARKER).write_text(json.dumps(record))
        spool = Spool(settings)  # the next start: it knows none of these records
        os.link(claim.path, spool.failed_folder / "a.npy")
        outcome = spool.handle(claim, converted)
        assert isinstance(outcome, Failed)
        assert files_under(spool.failed_folder) == ["a.npy", "a.npy.error.json"]
        assert json.loads((spool.failed_folder / "a.npy.error.json").read_text()) == record

    def test_failure_recorded_but_not_moved(self, spool: Spool, settings: Settings) -> None:
        """A recorded rejection is finished without converting again."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        (claim.folder / FAILURE_MARKER).write_text('{"input": "a.npy", "error": "corrupt"}')
        spool = Spool(settings)  # the next start: it knows none of these records
        outcome = spool.handle(claim, converted)
        assert isinstance(outcome, Failed)
        assert files_under(spool.failed_folder) == ["a.npy", "a.npy.error.json"]

    def test_converted_but_not_archived(self, spool: Spool, settings: Settings) -> None:
        """A durable output (marker written) is archived without converting again."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        (claim.folder / CONVERTED_MARKER).write_text('{"input": "a.npy", "rule": "exact"}')
        spool = Spool(settings)  # the next start: it knows none of these records

        def must_not_run(claim: Claim) -> dict[str, Any]:
            raise AssertionError("converted twice")

        outcome = spool.handle(claim, must_not_run)
        assert isinstance(outcome, Converted)
        assert outcome.summary["rule"] == "exact"

    def test_claimed_only_is_converted(self, spool: Spool) -> None:
        """A claim with no marker is simply converted (idempotent redo)."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        (recovered,) = spool.claims()
        assert recovered == claim
        assert isinstance(spool.handle(recovered, converted), Converted)

    def test_a_hard_link_made_by_the_producer_is_not_mistaken(self, spool: Spool) -> None:
        """An input with a second link elsewhere is converted, not taken as archived."""
        source = drop(spool, "a.npy")
        os.link(source, spool.inbox.parent / "producer-copy.npy")
        claim = spool.claim(source)
        assert claim is not None
        calls = Recorder()
        spool.handle(claim, calls)
        assert calls.names == ["a.npy"]
