"""Tests of the spool's commands: retry, counts, heartbeat (README: File protocol)."""

from __future__ import annotations

import json

import pytest

from niftidrop.spool import Spool
from spools import (
    converted,
    drop,
    files_under,
    rejected,
)


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

    def test_names_retry_finds_nothing_for(self, spool: Spool) -> None:
        """not_failed gives the names that match no failed input (by file name,
        relative path, or path), keeping their order; retry of such a name moves
        nothing."""
        claim = spool.claim(drop(spool, "site/a.npy"))
        assert claim is not None
        spool.handle(claim, rejected)
        path = str(spool.failed_folder / "site" / "a.npy")
        names = ["zz.npy", "a.npy", "site/a.npy", path, "other/a.npy", "a"]
        assert spool.not_failed(names) == ["zz.npy", "other/a.npy", "a"]
        assert spool.retry(["zz.npy"]) == []
        assert spool.retry([path]) == [spool.inbox / "site" / "a.npy"]
        assert spool.not_failed(["a.npy"]) == ["a.npy"]

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
