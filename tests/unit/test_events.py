"""Tests of the hand-off's events and their store (README: Hand-off)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from niftidrop.claims import Claim, Converted, Failed
from niftidrop.events import EVENTS, EventStore, Pending, event_of
from niftidrop.settings import load_settings
from niftidrop.spool import Spool
from niftidrop.steps import hooked
from spools import converted, drop, rejected


def hooked_spool(root: Path, **values: Any) -> Spool:
    """A spool whose settings name both hooks (or what `values` say)."""
    settings = load_settings(
        root=root, fsync=False, **{"on_converted": ["true"], "on_failed": ["true"], **values}
    )
    spool = Spool(settings)
    spool.create_folders()
    return spool


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return hooked_spool(tmp_path)


def store_of(spool: Spool) -> EventStore:
    assert spool.events is not None
    return spool.events


def event_files(spool: Spool) -> list[dict[str, Any]]:
    folder = spool.instance_folder / EVENTS
    if not folder.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(folder.iterdir())]


def claim_of(spool: Spool, relative: str, content: bytes = b"data") -> Claim:
    claim = spool.claim(drop(spool, relative, content))
    assert claim is not None
    return claim


class TestEventOf:
    def test_a_converted_event_has_its_log_fields_and_paths(self, tmp_path: Path) -> None:
        """converted: the summary's fields, every output, the sidecar and the archived input."""
        claim = Claim(tmp_path / "token", PurePosixPath("site/a.npy"))
        summary = {"input": "site/a.npy", "output": "/o/site/a.nii.gz", "sidecar": "/o/site/a.json"}
        event = event_of(Converted(claim, summary, Path("/a/site/a.npy")), "id-1")
        assert event == {
            "event": "converted",
            "id": "id-1",
            **summary,
            "outputs": ["/o/site/a.nii.gz"],
            "dseg": None,
            "archived": "/a/site/a.npy",
        }

    def test_split_outputs_and_a_deleted_input(self, tmp_path: Path) -> None:
        """Several outputs are all listed; a deleted input has no archived path."""
        claim = Claim(tmp_path / "token", PurePosixPath("a.npy"))
        summary = {"input": "a.npy", "output": ["/o/a_c0.nii.gz", "/o/a_c1.nii.gz"]}
        event = event_of(Converted(claim, summary, None), "id-2")
        assert event["outputs"] == ["/o/a_c0.nii.gz", "/o/a_c1.nii.gz"]
        assert event["archived"] is None
        assert event["sidecar"] is None

    def test_a_failed_event_has_its_error_and_paths(self, tmp_path: Path) -> None:
        """failed: input, error, message, reference, the failed input and its .error.json."""
        claim = Claim(tmp_path / "token", PurePosixPath("a.npy"))
        record = {
            "input": "a.npy",
            "error": "shape_mismatch",
            "message": "a.npy: expected (2,), found (3,)",
            "reference": "/lib/a.nii.gz",
            "failed_at": "2026-12-02T00:00:00Z",
        }
        event = event_of(Failed(claim, record, Path("/f/a-1.npy")), "id-3")
        assert event == {
            "event": "failed",
            "id": "id-3",
            "input": "a.npy",
            "error": "shape_mismatch",
            "message": "a.npy: expected (2,), found (3,)",
            "reference": "/lib/a.nii.gz",
            "failed_as": "/f/a-1.npy",
            "error_file": "/f/a-1.npy.error.json",
        }


class TestRecord:
    def test_the_event_is_kept_before_the_move_is_final(self, spool: Spool) -> None:
        """At the unlink that makes the move final, the event is already in the state folder."""
        seen: list[list[dict[str, Any]]] = []

        def watch(name: str) -> None:
            if name == "input_unlink":
                seen.append(event_files(spool))

        claim = claim_of(spool, "site/a.npy")
        with hooked(watch):
            spool.handle(claim, converted)
        [record] = seen[0]
        assert record["event"]["event"] == "converted"
        assert record["event"]["archived"] == str(spool.archive_folder / "site/a.npy")
        assert record["tries"] == {"hook": 0}
        assert event_files(spool) == [record]

    def test_the_event_is_handed_on_once_the_input_has_left(self, spool: Spool) -> None:
        """The listener hears of each event once, after the input left its claim."""
        heard: list[tuple[Pending, bool]] = []
        store = store_of(spool)
        claim = claim_of(spool, "a.npy")
        store.listener = lambda pending: heard.append((pending, claim.path.exists()))
        spool.handle(claim, rejected)
        [(pending, still_claimed)] = heard
        assert not still_claimed
        assert pending.event["event"] == "failed"
        assert pending.event["failed_as"] == str(spool.failed_folder / "a.npy")

    def test_each_target_is_listed(self, tmp_path: Path) -> None:
        """With notify_url too, an event waits for both its hook and the URL."""
        spool = hooked_spool(tmp_path, notify_url="http://127.0.0.1:9/events")
        spool.handle(claim_of(spool, "a.npy"), converted)
        assert event_files(spool)[0]["tries"] == {"hook": 0, "notify": 0}

    def test_an_event_nobody_wants_is_not_kept(self, tmp_path: Path) -> None:
        """With on_failed alone, a converted input records nothing."""
        spool = hooked_spool(tmp_path, on_converted=None)
        spool.handle(claim_of(spool, "a.npy"), converted)
        assert event_files(spool) == []
        spool.handle(claim_of(spool, "b.npy"), rejected)
        assert len(event_files(spool)) == 1

    def test_without_hooks_there_is_no_store(self, tmp_path: Path) -> None:
        """No hook and no URL: no store, nothing written."""
        spool = hooked_spool(tmp_path, on_converted=None, on_failed=None)
        assert spool.events is None
        spool.handle(claim_of(spool, "a.npy"), converted)
        assert not (spool.instance_folder / EVENTS).exists()

    def test_a_retry_keeps_the_id(self, spool: Spool) -> None:
        """The unlink fails after the record: the retry records the same event, once."""
        heard: list[Pending] = []
        store_of(spool).listener = heard.append

        def fail_unlink(name: str) -> None:
            if name == "input_unlink":
                raise OSError(5, "injected")

        claim = claim_of(spool, "a.npy")
        with hooked(fail_unlink), pytest.raises(OSError, match="injected"):
            spool.handle(claim, converted)
        [first] = event_files(spool)
        assert heard == []
        spool.handle(claim, converted)
        assert event_files(spool) == [first]
        assert [pending.id for pending in heard] == [first["event"]["id"]]

    def test_each_finish_has_its_own_id(self, spool: Spool) -> None:
        """The same name finished twice (in the same claim folder) gives two events."""
        for content in (b"one", b"two"):
            spool.handle(claim_of(spool, "a.npy", content), converted)
        ids = {record["event"]["id"] for record in event_files(spool)}
        assert len(ids) == 2

    def test_the_folder_is_made_again(self, spool: Spool) -> None:
        """The events folder removed under the service is made again by the next event."""
        spool.handle(claim_of(spool, "a.npy"), converted)
        shutil.rmtree(spool.instance_folder / EVENTS)
        spool.handle(claim_of(spool, "b.npy"), converted)
        assert len(event_files(spool)) == 1


class TestLoad:
    def test_an_event_whose_input_left_is_ready(self, spool: Spool, tmp_path: Path) -> None:
        """After a restart, an event whose input is in archive is delivered."""
        spool.handle(claim_of(spool, "a.npy"), converted)
        [record] = event_files(spool)
        ready = store_of(hooked_spool(tmp_path)).load()
        assert [pending.record() for pending in ready] == [record]

    def test_an_event_whose_input_is_still_claimed_waits_for_its_redo(
        self, spool: Spool, tmp_path: Path
    ) -> None:
        """Killed between the record and the unlink: the next start keeps the event for
        the redo, which records it again under the same id and then hands it on."""

        def die(name: str) -> None:
            if name == "input_unlink":
                raise KeyboardInterrupt  # as far as this spool knows, the process is gone

        claim = claim_of(spool, "a.npy")
        with hooked(die), pytest.raises(KeyboardInterrupt):
            spool.handle(claim, converted)
        [record] = event_files(spool)
        restarted = hooked_spool(tmp_path)
        heard: list[Pending] = []
        store_of(restarted).listener = heard.append
        assert store_of(restarted).load() == []
        [found] = restarted.claims()
        restarted.handle(found, converted)
        assert [pending.id for pending in heard] == [record["event"]["id"]]
        assert event_files(restarted) == [record]

    def test_files_that_are_no_events_are_left_alone(self, spool: Spool) -> None:
        """Another file in the folder, or a temporary one, is neither loaded nor removed."""
        folder = spool.instance_folder / EVENTS
        folder.mkdir()
        (folder / "notes.json").write_text('{"hello": 1}')
        (folder / "README").write_text("mine")
        assert store_of(spool).load() == []
        assert sorted(path.name for path in folder.iterdir()) == ["README", "notes.json"]

    def test_oldest_first_and_removed(self, spool: Spool, tmp_path: Path) -> None:
        """Pending events load oldest first; a removed one is gone."""
        for name in ("b.npy", "a.npy", "c.npy"):
            spool.handle(claim_of(spool, name), converted)
        store = store_of(hooked_spool(tmp_path))
        ready = store.load()
        assert [pending.input for pending in ready] == ["b.npy", "a.npy", "c.npy"]
        store.remove(ready[0])
        assert [pending.input for pending in store.load()] == ["a.npy", "c.npy"]

    def test_tries_are_saved(self, spool: Spool, tmp_path: Path) -> None:
        """A saved count of tries is what the next start reads."""
        spool.handle(claim_of(spool, "a.npy"), converted)
        store = store_of(hooked_spool(tmp_path))
        [pending] = store.load()
        pending.tries["hook"] = 3
        store.save(pending)
        assert store.load()[0].tries == {"hook": 3}


class TestAdoption:
    def test_a_dead_instance_s_events_are_taken_over(self, tmp_path: Path) -> None:
        """An expired instance's event whose input has left is renamed into this
        instance's folder and handed on; one whose input is still claimed is removed
        (the adopted claim's finish records it again), and is delivered once."""
        spool = hooked_spool(tmp_path)
        dead = hooked_spool(tmp_path, instance="b-node")
        dead.lock()
        dead.handle(claim_of(dead, "done.npy"), converted)  # delivery never came

        def crash(name: str) -> None:
            if name == "input_unlink":
                raise KeyboardInterrupt  # the instance dies with the event recorded

        half = claim_of(dead, "half.npy")
        with hooked(crash), pytest.raises(KeyboardInterrupt):
            dead.handle(half, converted)
        assert len(event_files(dead)) == 2
        old = time.time() - 10 * dead.lease_timeout
        os.utime(dead.lease.path, (old, old))
        heard: list[Pending] = []
        store_of(spool).listener = heard.append
        assert store_of(spool).adopt() == [("b-node", 1)]
        assert [pending.event["input"] for pending in heard] == ["done.npy"]
        assert event_files(dead) == []
        assert [record["event"]["input"] for record in event_files(spool)] == ["done.npy"]
        [(_, [claim])] = spool.adopt()
        spool.handle(claim, converted)
        assert [pending.event["input"] for pending in heard] == ["done.npy", "half.npy"]
        assert store_of(spool).adopt() == []

    def test_an_event_is_judged_through_this_host_s_mount(self, tmp_path: Path) -> None:
        """The dead instance mounted the spool at another path: whether its event's
        input is still claimed is looked up in its claims folder as seen here."""
        spool = hooked_spool(tmp_path / "here")
        dead = hooked_spool(tmp_path / "here", instance="b-node")
        dead.lock()

        def crash(name: str) -> None:
            if name == "input_unlink":
                raise KeyboardInterrupt

        claim = claim_of(dead, "half.npy")
        with hooked(crash), pytest.raises(KeyboardInterrupt):
            dead.handle(claim, converted)
        [path] = (dead.instance_folder / EVENTS).iterdir()
        record = json.loads(path.read_text())
        there = str(tmp_path / "there") + record["claimed"].removeprefix(str(tmp_path / "here"))
        path.write_text(json.dumps({**record, "claimed": there}))
        old = time.time() - 10 * dead.lease_timeout
        os.utime(dead.lease.path, (old, old))
        assert store_of(spool).adopt() == []  # still claimed: recorded again by its finish
        assert event_files(dead) == []
