"""Tests of the file protocol: claim, archive, failed, crash recovery, retry (SPEC §1, §4)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from niftidrop.claims import (
    CLAIMS,
    COMMIT_RECORD,
    CONVERTED_MARKER,
    FAILURE_MARKER,
    SPARE_FOLDERS,
    Claim,
    Converted,
    Failed,
    error_record,
)
from niftidrop.errors import ConfigError, ConversionError, ErrorCode
from niftidrop.names import temp_path_for
from niftidrop.settings import Settings, load_settings
from niftidrop.spool import Spool
from niftidrop.steps import hooked


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(root=tmp_path, fsync=False)


@pytest.fixture
def spool(settings: Settings) -> Spool:
    spool = Spool(settings)
    spool.create_folders()
    return spool


def drop(spool: Spool, relative: str, content: bytes = b"data") -> Path:
    path = spool.inbox / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


CLAIMS_FOLDER = f"/{CLAIMS}/"


def converted(claim: Claim) -> dict[str, Any]:
    return {"input": str(claim.relative), "seconds": 0.0}


def rejected(claim: Claim) -> dict[str, Any]:
    raise ConversionError(ErrorCode.SHAPE_MISMATCH, f"{claim.name}: expected (2,), found (3,)")


class Recorder:
    """A converter that records which claims it was asked to convert."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, claim: Claim) -> dict[str, Any]:
        self.names.append(claim.name)
        return converted(claim)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def scan_inbox_names(spool: Spool) -> list[str]:
    """The inbox's files outside the state folder (which holds the owner id)."""
    return [name for name in files_under(spool.inbox) if not name.startswith(".niftidrop/")]


class TestSetUp:
    def test_creates_every_folder(self, spool: Spool) -> None:
        """create_folders makes inbox, outbox, archive, failed and the claims folder."""
        for folder in (spool.inbox, spool.outbox, spool.archive_folder, spool.failed_folder):
            assert folder.is_dir()
        assert spool.claims_folder.is_dir()

    def test_a_file_in_place_of_a_folder_is_refused(self, settings: Settings) -> None:
        """A folder setting naming a file stops the start with a message naming it."""
        settings.outbox_dir.parent.mkdir(parents=True, exist_ok=True)
        settings.outbox_dir.write_text("")
        with pytest.raises(ConfigError, match="outbox"):
            Spool(settings).create_folders()

    def test_second_lock_is_refused(self, settings: Settings, spool: Spool) -> None:
        """Two services on one state folder cannot run at once."""
        spool.lock()
        try:
            with pytest.raises(ConfigError, match="in use"):
                Spool(settings).lock()
        finally:
            spool.unlock()
        again = Spool(settings)
        again.lock()
        again.unlock()


class TestClaim:
    def test_claim_moves_the_input_keeping_its_relative_path(self, spool: Spool) -> None:
        """After a claim the input is no longer in the inbox and its relative path is kept."""
        source = drop(spool, "site/a.npy")
        claim = spool.claim(source)
        assert claim is not None
        assert not source.exists()
        assert claim.path.read_bytes() == b"data"
        assert str(claim.relative) == "site/a.npy"
        assert claim.stem == "a"

    def test_same_name_twice_never_clobbers(self, spool: Spool) -> None:
        """Two inputs with one name are claimed side by side."""
        first = spool.claim(drop(spool, "a.npy", b"one"))
        second = spool.claim(drop(spool, "a.npy", b"two"))
        assert first is not None
        assert second is not None
        assert first.path.read_bytes() == b"one"
        assert second.path.read_bytes() == b"two"

    def test_inbox_behind_a_symlink_is_claimed(self, tmp_path: Path) -> None:
        """An inbox whose path goes through a symlink works, subfolders included."""
        (tmp_path / "real").mkdir()
        (tmp_path / "alias").symlink_to(tmp_path / "real")
        spool = Spool(load_settings(root=tmp_path / "alias", fsync=False))
        spool.create_folders()
        for relative in ("a.npy", "site/b.npy"):
            assert spool.claim(drop(spool, relative)) is not None

    def test_subfolder_replaced_by_a_symlink_is_not_followed(
        self, spool: Spool, tmp_path: Path
    ) -> None:
        """A rename never reaches through a symlinked subfolder to a file outside."""
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret.npy").write_bytes(b"secret")
        (spool.inbox / "site").symlink_to(outside)
        assert spool.claim(spool.inbox / "site" / "secret.npy") is None
        assert (outside / "secret.npy").read_bytes() == b"secret"

    def test_subfolder_swapped_for_a_symlink_during_claims_never_reaches_outside(
        self, spool: Spool, tmp_path: Path, flip_names: Callable[[Path, Path], Callable[[], None]]
    ) -> None:
        """While a subfolder is exchanged with a symlink to an outside folder again and
        again, claims take only inbox files, never one that exists only outside."""
        outside = tmp_path / "outside"
        outside.mkdir()
        link = tmp_path / "link"
        link.symlink_to(outside)
        names = [f"x{number}.npy" for number in range(300)]
        for name in names:
            (outside / name).write_bytes(b"outside")
            drop(spool, f"sub/{name}", b"inside")
        claimed = []
        flip_names(spool.inbox / "sub", link)
        for name in names:
            with contextlib.suppress(OSError):  # the service would offer it again later
                claim = spool.claim(spool.inbox / "sub" / name)
                if claim is not None:
                    claimed.append(claim.path.read_bytes())
        assert sorted(path.name for path in outside.iterdir()) == sorted(names)
        assert claimed
        assert set(claimed) == {b"inside"}

    def test_claim_walks_no_symlink_on_the_way(self, spool: Spool, tmp_path: Path) -> None:
        """A symlink anywhere between the inbox and the input stops the claim."""
        outside = tmp_path / "outside"
        (outside / "deeper").mkdir(parents=True)
        (outside / "deeper" / "a.npy").write_bytes(b"secret")
        (spool.inbox / "real").mkdir()
        (spool.inbox / "real" / "hop").symlink_to(outside)
        assert spool.claim(spool.inbox / "real" / "hop" / "deeper" / "a.npy") is None
        assert (outside / "deeper" / "a.npy").read_bytes() == b"secret"

    def test_vanished_input_gives_none_and_no_claim(self, spool: Spool) -> None:
        """A file gone before the rename is not claimed and leaves nothing behind."""
        assert spool.claim(spool.inbox / "gone.npy") is None
        assert files_under(spool.claims_folder) == []
        spool.remove_spare_folders()
        assert list(spool.claims_folder.iterdir()) == []

    def test_claims_are_listed_oldest_first(self, spool: Spool) -> None:
        """Recovery sees claims ordered by the input's modification time."""
        for index, name in enumerate(["new.npy", "old.npy", "mid.npy"]):
            path = drop(spool, name)
            os.utime(path, ns=(0, [3, 1, 2][index] * 10**9))
            spool.claim(path)
        assert [claim.name for claim in spool.claims()] == ["old.npy", "mid.npy", "new.npy"]

    def test_empty_claim_folders_are_removed(self, spool: Spool) -> None:
        """A claim folder without an input (crash before the rename) is cleaned up."""
        (spool.claims_folder / "abandoned" / "sub").mkdir(parents=True)
        assert spool.claims() == []
        assert list(spool.claims_folder.iterdir()) == []


def deep_folder(top: Path, length: int) -> Path:
    """A folder under `top` whose path is about `length` bytes (folders of 200 bytes)."""
    folder = top
    while len(os.fsencode(folder)) + 201 < length:
        folder = folder / ("d" * 200)
    folder = folder / ("e" * (length - len(os.fsencode(folder)) - 1))
    folder.mkdir(parents=True)
    return folder


class TestNameLimits:
    """Inputs whose names or paths cannot be carried through fail as bad_name."""

    def test_a_name_of_255_bytes_fails_under_a_shortened_name(self, spool: Spool) -> None:
        """Its outputs and error record cannot be named: failed keeps it shortened, and
        the record names the original; it is never converted."""
        name = "case_" + "x" * 246 + ".npy"
        assert len(name) == 255
        claim = spool.claim(drop(spool, f"site/{name}", b"long"))
        assert claim is not None
        assert len(claim.name) < 230
        assert claim.name.startswith("case_xxx")
        assert claim.name.endswith(".npy")
        recorder = Recorder()
        outcome = spool.handle(claim, recorder)
        assert recorder.names == []
        assert isinstance(outcome, Failed)
        assert outcome.failed_as == spool.failed_folder / "site" / claim.name
        assert outcome.failed_as.read_bytes() == b"long"
        record = json.loads(outcome.failed_as.with_name(claim.name + ".error.json").read_text())
        assert record["error"] == "bad_name"
        assert record["input"] == f"site/{name}"
        assert "255 bytes" in record["message"]
        assert scan_inbox_names(spool) == []
        assert files_under(spool.claims_folder) == []

    def test_names_that_fit_are_converted(self, spool: Spool) -> None:
        """A long name that leaves room for every name made from it is kept as it is."""
        name = "case_" + "x" * 180 + ".npy"
        claim = spool.claim(drop(spool, name))
        assert claim is not None
        assert claim.name == name
        assert isinstance(spool.handle(claim, Recorder()), Converted)

    def test_a_claim_path_beyond_the_path_limit_fails_at_the_top_of_failed(
        self, spool: Spool
    ) -> None:
        """An input whose inbox path fits but whose claimed path would not is claimed
        (through folder descriptors) and failed at the top of failed."""
        path_max = os.pathconf(spool.inbox, "PC_PATH_MAX")
        folder = deep_folder(spool.inbox, path_max - 20)
        source = folder / "case.npy"
        source.write_bytes(b"deep")
        relative = source.relative_to(spool.inbox).as_posix()
        claim = spool.claim(source)
        assert claim is not None
        assert claim.relative == PurePosixPath("case.npy")
        outcome = spool.handle(claim, Recorder())
        assert isinstance(outcome, Failed)
        assert outcome.failed_as == spool.failed_folder / "case.npy"
        assert outcome.record["input"] == relative
        assert f"shorter than {path_max} bytes" in outcome.record["message"]
        assert not os.path.lexists(source)

    def test_folders_too_deep_to_mirror_fail(self, spool: Spool) -> None:
        """Relative paths more folders deep than can be mirrored fail as bad_name."""
        source = drop(spool, "/".join(["f"] * 300) + "/case.npy")
        claim = spool.claim(source)
        assert claim is not None
        outcome = spool.handle(claim, Recorder())
        assert isinstance(outcome, Failed)
        assert outcome.record["error"] == "bad_name"
        assert "folders deep" in outcome.record["message"]

    def test_a_crash_after_the_bad_name_claim_still_fails_it(
        self, settings: Settings, spool: Spool
    ) -> None:
        """The record is in the claim before the input: recovery fails it, never converts."""
        name = "case_" + "y" * 246 + ".npy"
        spool.claim(drop(spool, name))
        recovered = Spool(settings)
        (claim,) = recovered.claims()
        recorder = Recorder()
        assert isinstance(recovered.handle(claim, recorder), Failed)
        assert recorder.names == []


class TestDiscovery:
    """Recovery finds every claim, whatever its depth, and never loses one."""

    def test_a_claim_deeper_than_the_recursion_limit_is_found(self, spool: Spool) -> None:
        """Claim folders are walked by a loop: a deep claimed input is found."""
        relative = PurePosixPath(*["d"] * 1100, "a.npy")
        path = spool.claims_folder / "deep"
        for part in relative.parts:  # one by one: mkdir(parents=True) recurses
            path.mkdir()
            path = path / part
        path.write_bytes(b"deep")
        try:
            (claim,) = spool.claims()
            assert claim.relative == relative
        finally:
            path.unlink()
            while path.parent != spool.claims_folder:
                path = path.parent
                path.rmdir()

    def test_an_unreadable_claim_folder_is_kept(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A claim folder whose first listing fails (EIO) is neither handled nor removed."""
        claimed = spool.claim(drop(spool, "sub/a.npy"))
        assert claimed is not None
        scandir = os.scandir
        calls: list[object] = []

        def failing_once(target: Any) -> Any:
            calls.append(target)
            if len(calls) == 1:
                raise OSError(errno.EIO, "injected", str(target))
            return scandir(target)

        monkeypatch.setattr(os, "scandir", failing_once)
        assert spool.claims() == []
        monkeypatch.undo()
        assert claimed.path.read_bytes() == b"data"
        assert [claim.path for claim in spool.claims()] == [claimed.path]


class TestClaimFolders:
    """Token folders outlive their claims: creating one per input is costly."""

    def test_a_claim_folder_serves_the_next_claim(self, spool: Spool) -> None:
        """Inputs handled one after another all use the same emptied folder."""
        folders = set()
        for name in ["a.npy", "site/b.npy", "c.npy"]:
            claim = spool.claim(drop(spool, name))
            assert claim is not None
            folders.add(claim.folder)
            spool.handle(claim, converted)
        assert len(folders) == 1
        assert files_under(spool.claims_folder) == []
        assert files_under(spool.archive_folder) == ["a.npy", "c.npy", "site/b.npy"]

    def test_claims_in_flight_never_share_a_folder(self, spool: Spool) -> None:
        """Only a finished claim's folder is handed out again."""
        first = spool.claim(drop(spool, "a.npy"))
        second = spool.claim(drop(spool, "a.npy", b"other"))
        assert first is not None
        assert second is not None
        assert first.folder != second.folder
        spool.handle(first, converted)
        third = spool.claim(drop(spool, "a.npy", b"third"))
        assert third is not None
        assert third.folder == first.folder
        assert second.path.read_bytes() == b"other"

    def test_spare_folders_are_capped(self, spool: Spool) -> None:
        """After a burst of simultaneous claims only SPARE_FOLDERS folders are kept."""
        claims = [spool.claim(drop(spool, f"{index}.npy")) for index in range(SPARE_FOLDERS + 6)]
        for claim in claims:
            assert claim is not None
            spool.handle(claim, converted)
        assert len(list(spool.claims_folder.iterdir())) == SPARE_FOLDERS
        spool.remove_spare_folders()
        assert list(spool.claims_folder.iterdir()) == []

    def test_the_commit_record_leaves_with_the_claim(self, tmp_path: Path) -> None:
        """With rename, a claim's `.committing.json` does not pass to the next claim."""
        spool = Spool(load_settings(root=tmp_path, fsync=False, on_conflict="rename"))
        spool.create_folders()
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None

        def convert_with_record(claim: Claim) -> dict[str, Any]:
            (claim.folder / COMMIT_RECORD).write_text("{}")
            return converted(claim)

        spool.handle(claim, convert_with_record)
        assert files_under(spool.claims_folder) == []

    def test_a_folder_still_holding_its_input_is_not_released(self, spool: Spool) -> None:
        """Releasing a claim whose input is still there is a bug: refused, input kept."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        with pytest.raises(AssertionError, match="still claimed"):
            spool.release(claim)
        assert claim.path.read_bytes() == b"data"
        assert spool.claims() == [claim]

    def test_recovery_forgets_spare_folders(self, spool: Spool) -> None:
        """`claims()` removes empty folders, spare ones included, and claiming goes on."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        spool.handle(claim, converted)
        assert spool.claims() == []
        assert list(spool.claims_folder.iterdir()) == []
        again = spool.claim(drop(spool, "b.npy"))
        assert again is not None
        assert again.path.read_bytes() == b"data"

    @pytest.mark.parametrize(("on_conflict", "marked"), [("overwrite", False), ("rename", True)])
    def test_conversions_are_remembered_only_when_a_redo_differs(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_conflict: str, marked: bool
    ) -> None:
        """`.converted.json` is written for rename/fail; an overwrite redo is idempotent."""
        spool = Spool(load_settings(root=tmp_path, on_conflict=on_conflict, fsync=False))
        spool.create_folders()
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None

        real_link = os.link

        def archive_fails(source: Any, target: Any, **kwargs: Any) -> None:
            if str(spool.archive_folder) in str(target):  # after the conversion
                raise OSError(5, "Input/output error")
            real_link(source, target, **kwargs)

        monkeypatch.setattr(os, "link", archive_fails)
        with pytest.raises(OSError, match="Input/output"):
            spool.handle(claim, converted)
        assert (claim.folder / CONVERTED_MARKER).exists() == marked
        assert claim.path.exists()


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
        """A ConversionError puts the input and <name>.error.json in failed (SPEC §4)."""
        claim = spool.claim(drop(spool, "site/a.npy"))
        assert claim is not None
        outcome = spool.handle(claim, rejected)
        assert isinstance(outcome, Failed)
        assert files_under(spool.failed_folder) == ["site/a.npy", "site/a.npy.error.json"]
        record = json.loads((spool.failed_folder / "site/a.npy.error.json").read_text())
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


def refuse_links_from_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Archive and failed on another file system: links from the claim folder fail."""
    real_link = os.link

    def link(source: Any, target: Any, **kwargs: Any) -> None:
        if CLAIMS_FOLDER in str(source):
            raise OSError(18, "Invalid cross-device link")
        real_link(source, target, **kwargs)

    monkeypatch.setattr(os, "link", link)


def fail_once(monkeypatch: pytest.MonkeyPatch, method: str, when: Callable[[Path], bool]) -> None:
    """Path.<method> raises EIO the first time `when(path)` holds."""
    real = getattr(Path, method)
    failed: list[Path] = []

    def once(self: Path, *args: Any, **kwargs: Any) -> Any:
        if not failed and when(self):
            failed.append(self)
            raise OSError(5, "Input/output error")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, once)


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

    def test_linked_into_archive_but_not_unlinked(self, spool: Spool) -> None:
        """A crash between link and unlink finishes as converted, without a duplicate."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        (claim.folder / CONVERTED_MARKER).write_text('{"input": "a.npy"}')
        os.link(claim.path, spool.archive_folder / "a.npy")
        calls = Recorder()
        outcome = spool.handle(claim, calls)
        assert isinstance(outcome, Converted)
        assert calls.names == []
        assert files_under(spool.archive_folder) == ["a.npy"]
        assert spool.claims() == []

    def test_linked_into_failed_before_the_error_file(self, spool: Spool) -> None:
        """A crash after the failed link writes the missing .error.json from the claim."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        record = {"input": "a.npy", "error": "corrupt", "message": "bad"}
        (claim.folder / FAILURE_MARKER).write_text(json.dumps(record))
        os.link(claim.path, spool.failed_folder / "a.npy")
        outcome = spool.handle(claim, converted)
        assert isinstance(outcome, Failed)
        assert files_under(spool.failed_folder) == ["a.npy", "a.npy.error.json"]
        assert json.loads((spool.failed_folder / "a.npy.error.json").read_text()) == record

    def test_failure_recorded_but_not_moved(self, spool: Spool) -> None:
        """A recorded rejection is finished without converting again."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        (claim.folder / FAILURE_MARKER).write_text('{"input": "a.npy", "error": "corrupt"}')
        outcome = spool.handle(claim, converted)
        assert isinstance(outcome, Failed)
        assert files_under(spool.failed_folder) == ["a.npy", "a.npy.error.json"]

    def test_converted_but_not_archived(self, spool: Spool) -> None:
        """A durable output (marker written) is archived without converting again."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        (claim.folder / CONVERTED_MARKER).write_text('{"input": "a.npy", "rule": "exact"}')

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

    def test_stale_temporaries_are_removed(self, spool: Spool) -> None:
        """This service's hidden .tmp files in outbox, archive, failed and state go."""
        claim = Claim(spool.claims_folder / "token", PurePosixPath("sub/a.npy"))
        stale = [
            temp_path_for(spool.outbox / "sub" / "a.nii.gz", spool.owner_for(claim)),
            temp_path_for(spool.archive_folder / "a.npy", spool.owner_for(claim)),
            temp_path_for(spool.failed_folder / "a.npy.error.json", spool.owner),
            spool.state / ".heartbeat.json.x3.tmp",
        ]
        kept = [spool.outbox / "a.nii.gz", spool.inbox / ".producer.npy.tmp"]
        for path in stale + kept:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        assert spool.remove_stale_temporaries() == 4
        assert not any(path.exists() for path in stale)
        assert all(path.exists() for path in kept)

    def test_another_services_temporaries_are_left_alone(
        self, spool: Spool, tmp_path: Path
    ) -> None:
        """In a shared outbox, archive or failed a start removes only its own temporaries."""
        other = Spool(load_settings(root=tmp_path, state_dir=tmp_path / "inbox" / ".other"))
        other.create_folders()
        assert other.owner != spool.owner
        theirs = [
            temp_path_for(other.outbox / "b.nii.gz", other.owner),
            temp_path_for(other.archive_folder / "b.npy", f"{other.owner}-token"),
            temp_path_for(other.failed_folder / "b.npy.error.json", other.owner),
            temp_path_for(other.outbox / "c.nii.gz"),  # `niftidrop convert`, no owner
        ]
        mine = temp_path_for(spool.outbox / "a.nii.gz", spool.owner)
        for path in [*theirs, mine]:
            path.write_bytes(b"in flight")
        assert spool.remove_stale_temporaries() == 1
        assert all(path.read_bytes() == b"in flight" for path in theirs)
        assert not mine.exists()

    def test_the_owner_id_is_kept_in_the_state_folder(self, settings: Settings) -> None:
        """Every Spool of one state folder has the same id, made once."""
        first = Spool(settings)
        first.create_folders()
        assert Spool(settings).owner == first.owner
        assert (first.state / "owner").read_text().strip() == first.owner


class TestCommands:
    def test_retry_moves_failed_inputs_back(self, spool: Spool) -> None:
        """retry puts inputs back under their original relative path, without .error.json."""
        for name in ("site/a.npy", "b.npy"):
            claim = spool.claim(drop(spool, name))
            assert claim is not None
            spool.handle(claim, rejected)
        moved = spool.retry(["a.npy"])
        assert moved == [spool.inbox / "site" / "a.npy"]
        assert files_under(spool.failed_folder) == ["b.npy", "b.npy.error.json"]
        assert spool.retry() == [spool.inbox / "b.npy"]
        assert files_under(spool.failed_folder) == []

    def test_retry_never_overwrites_the_inbox(self, spool: Spool) -> None:
        """A name already back in the inbox makes retry pick a unique one."""
        claim = spool.claim(drop(spool, "a.npy", b"old"))
        assert claim is not None
        spool.handle(claim, rejected)
        drop(spool, "a.npy", b"new")
        (moved,) = spool.retry()
        assert moved.name == "a-1.npy"
        assert (spool.inbox / "a.npy").read_bytes() == b"new"

    def test_counts(self, spool: Spool) -> None:
        """counts reports inputs per folder and claims."""
        drop(spool, "waiting.npy")
        spool.claim(drop(spool, "claimed.npy"))
        for handler in (converted, rejected):
            claim = spool.claim(drop(spool, "x.npy"))
            assert claim is not None
            spool.handle(claim, handler)
        assert spool.counts() == {
            "inbox": 1,
            "claimed": 1,
            "outbox": 0,
            "archive": 1,
            "failed": 1,
        }

    def test_heartbeat_age(self, spool: Spool) -> None:
        """The heartbeat's age is measured from its last write; None before the first."""
        assert spool.heartbeat_age(0.0) is None
        spool.write_heartbeat({"pid": 1})
        age = spool.heartbeat_age(spool.heartbeat_path.stat().st_mtime + 2.0)
        assert age == pytest.approx(2.0)
        assert json.loads(spool.heartbeat_path.read_text())["pid"] == 1
