"""Tests of claiming: inputs into claim folders, name limits, the claims found at start."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from niftidrop.claims import (
    COMMIT_RECORD,
    CONVERTED_MARKER,
    FAILURE_MARKER,
    SPARE_FOLDERS,
    Claim,
    Converted,
    Failed,
)
from niftidrop.names import temp_path_for
from niftidrop.settings import Settings, load_settings
from niftidrop.spool import Spool
from spools import (
    Recorder,
    converted,
    drop,
    files_under,
    scan_inbox_names,
)


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


class TestProfiles:
    def test_outputs_are_measured_as_the_input_profile_names_them(self, tmp_path: Path) -> None:
        """Whether an input's outputs fit is judged by its profile's settings: with
        rename and split they are 11 bytes longer, so in an outbox with room for
        only the top level's names, the profile's input fails as bad_name and the
        top level's input of the same length is converted."""
        path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
        outbox = deep_folder(tmp_path, path_max - 60)
        profile = {"name": "long", "match": "b*", "on_conflict": "rename", "channels": "split"}
        settings = load_settings(root=tmp_path, outbox=outbox, fsync=False, profiles=[profile])
        spool = Spool(settings)
        spool.create_folders()
        outcomes = {}
        for name in ("aaaa.npy", "bbbb.npy"):
            claim = spool.claim(drop(spool, name))
            assert claim is not None
            outcomes[name] = spool.handle(claim, Recorder())
        assert isinstance(outcomes["aaaa.npy"], Converted)
        failed = outcomes["bbbb.npy"]
        assert isinstance(failed, Failed)
        assert failed.record["error"] == "bad_name"
        assert f"paths shorter than {path_max} bytes" in failed.record["message"]


def _expire(spool: Spool) -> None:
    """Make `spool`'s instance look dead: its lease last renewed long ago."""
    old = time.time() - 10 * spool.lease_timeout
    os.utime(spool.lease.path, (old, old))


class TestInstances:
    """Claims per instance, and those of dead instances (README: Many instances, one spool)."""

    @pytest.fixture
    def other(self, settings: Settings) -> Iterator[Spool]:
        other = Spool(settings.model_copy(update={"instance": "b-node"}))
        other.create_folders()
        other.lock()
        yield other
        other.unlock()

    def test_claims_are_kept_per_instance(self, spool: Spool, other: Spool) -> None:
        """Each instance claims into its own folder and lists only its own claims."""
        mine = spool.claim(drop(spool, "a.npy"))
        theirs = other.claim(drop(other, "b.npy"))
        assert mine is not None
        assert theirs is not None
        assert mine.folder.parent == spool.state / "instances" / spool.instance / "claimed"
        assert theirs.folder.parent == spool.state / "instances" / "b-node" / "claimed"
        assert spool.claims() == [mine]
        assert other.claims() == [theirs]

    def test_a_live_instance_s_claims_are_not_adopted(self, spool: Spool, other: Spool) -> None:
        """A claim of an instance whose lease is fresh stays its own."""
        assert other.claim(drop(other, "b.npy")) is not None
        assert spool.adopt() == []
        assert len(other.claims()) == 1

    def test_an_expired_instance_s_claims_are_adopted_and_finished(
        self, spool: Spool, other: Spool
    ) -> None:
        """Its claims are renamed into this instance's folder, subfolders kept, and
        finish here; its empty claim folders go, a visible file in one stays."""
        first = other.claim(drop(other, "sub/b.npy"))
        second = other.claim(drop(other, "c.npy"))
        assert first is not None
        assert second is not None
        empty = other.claims_folder / "emptytoken"
        (empty / "sub").mkdir(parents=True)
        _expire(other)
        [(name, adopted)] = spool.adopt()
        assert name == "b-node"
        assert sorted(str(claim.relative) for claim in adopted) == ["c.npy", "sub/b.npy"]
        assert all(claim.folder.parent == spool.claims_folder for claim in adopted)
        assert not empty.exists()
        assert other.claims() == []
        for claim in adopted:
            assert isinstance(spool.handle(claim, converted), Converted)
        assert files_under(spool.archive_folder) == ["c.npy", "sub/b.npy"]
        assert spool.adopt() == []

    def test_a_claim_adopted_back_keeps_what_the_other_instance_recorded(
        self, spool: Spool, other: Spool
    ) -> None:
        """A claim taken from this instance while it was paused, then adopted back
        (into the folder it had), is finished from the record the other wrote."""
        claim = spool.claim(drop(spool, "a.npy"))
        assert claim is not None
        spool.lock()
        _expire(spool)
        [(_, [theirs])] = other.adopt()
        (theirs.folder / FAILURE_MARKER).write_text('{"input": "a.npy", "error": "corrupt"}')
        _expire(other)
        [(_, [back])] = spool.adopt()
        assert back.folder == claim.folder
        outcome = spool.handle(back, converted)
        spool.unlock()
        assert isinstance(outcome, Failed)
        assert outcome.record["error"] == "corrupt"
        assert files_under(spool.failed_folder) == ["a.npy", "a.npy.error.json"]

    def test_of_two_adopters_exactly_one_takes_each_claim(
        self, settings: Settings, spool: Spool, other: Spool
    ) -> None:
        """Two live instances adopting the same dead one's claims split them."""
        for number in range(20):
            assert other.claim(drop(other, f"case_{number}.npy")) is not None
        _expire(other)
        third = Spool(settings.model_copy(update={"instance": "c-node"}))
        third.lock()
        try:
            taken = []
            for claim_a, claim_b in itertools.zip_longest(
                *(dict(spool_.adopt()).get("b-node", []) for spool_ in (spool, third))
            ):
                taken += [claim for claim in (claim_a, claim_b) if claim is not None]
        finally:
            third.unlock()
        names = sorted(str(claim.relative) for claim in taken)
        assert names == sorted(f"case_{number}.npy" for number in range(20))

    def test_an_earlier_version_s_claims_are_adopted(self, spool: Spool) -> None:
        """Claims in `<state>/claimed/` (one instance per state folder, before) are
        finished by the first start of this version."""
        legacy = spool.state / "claimed" / "oldtoken"
        legacy.mkdir(parents=True)
        (legacy / "a.npy").write_bytes(b"data")
        [(name, [claim])] = spool.adopt()
        assert name == "(earlier version)"
        assert claim.relative == PurePosixPath("a.npy")
        assert isinstance(spool.handle(claim, converted), Converted)
        assert files_under(spool.archive_folder) == ["a.npy"]

    def test_an_expired_instance_s_temporaries_are_tidied_a_live_one_s_kept(
        self, settings: Settings, spool: Spool, other: Spool
    ) -> None:
        """At start an instance removes the temporaries of instances whose lease has
        expired, in outbox and in their state folder, never a live one's."""
        third = Spool(settings.model_copy(update={"instance": "c-node"}))
        third.lock()
        try:
            dead = [
                temp_path_for(other.outbox / "b.nii.gz", other.owner),
                other.instance_folder / ".heartbeat.json.x1.tmp",
            ]
            live = [
                temp_path_for(third.outbox / "c.nii.gz", third.owner),
                third.instance_folder / ".heartbeat.json.x2.tmp",
            ]
            for path in dead + live:
                path.write_bytes(b"in flight")
            _expire(other)
            assert spool.remove_stale_temporaries() == 2
        finally:
            third.unlock()
        assert not any(path.exists() for path in dead)
        assert all(path.read_bytes() == b"in flight" for path in live)
