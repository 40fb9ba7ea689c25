"""Leases on instance names (README: Many instances, one spool): one live instance
per name, taken over only once expired by the file system's clock, and an instance
paused past its lease finds out when it comes back (shared file systems:
tests/integration/test_sharedfs.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from leases import race_for_name
from niftidrop.errors import ConfigError
from niftidrop.instances import (
    LEASE,
    TAKEOVER,
    InstanceLease,
    NameTaken,
    leases,
    read_lease,
)


def age(path: Path, seconds: float) -> None:
    """Make `path` look last written `seconds` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


class TestTake:
    def test_a_live_name_is_refused_naming_its_holder(self, tmp_path: Path) -> None:
        """A second instance of a live name gets NameTaken naming host, pid and age."""
        first = InstanceLease(tmp_path, "node-a", lease_timeout=60)
        first.take()
        with pytest.raises(NameTaken, match=rf"pid {os.getpid()}.*renewed 0 s ago"):
            InstanceLease(tmp_path, "node-a", lease_timeout=60).take()
        assert isinstance(NameTaken("x"), ConfigError)  # the CLI's exit 2

    def test_given_up_names_are_free(self, tmp_path: Path) -> None:
        """After a clean stop the name is taken again at once; no lease file is left."""
        first = InstanceLease(tmp_path, "node-a", lease_timeout=60)
        first.take()
        first.give_up()
        assert not first.path.exists()
        second = InstanceLease(tmp_path, "node-a", lease_timeout=60)
        second.take()
        assert second.holds()

    def test_other_names_are_independent(self, tmp_path: Path) -> None:
        """Two names, two leases, both listed."""
        for name in ("node-a", "node-b"):
            InstanceLease(tmp_path, name, lease_timeout=60).take()
        assert [lease.name for lease in leases(tmp_path)] == ["node-a", "node-b"]
        assert all(lease.live(60) for lease in leases(tmp_path))

    def test_an_expired_lease_is_taken_over_and_kept_aside(self, tmp_path: Path) -> None:
        """Older than lease_timeout: the newcomer holds the name, the old lease is
        renamed aside, and the old holder's renewal says it lost the lease."""
        old = InstanceLease(tmp_path, "node-a", lease_timeout=10)
        old.take()
        age(old.path, 30)
        new = InstanceLease(tmp_path, "node-a", lease_timeout=10)
        new.take()
        assert new.holds()
        assert not old.holds()
        renewal = old.renew()
        assert renewal.lost
        found = read_lease(new.path, "node-a")
        assert found is not None
        assert found.token == new.token
        aside = [path.name for path in new.folder.iterdir() if path.name != LEASE]
        assert aside == [f"{LEASE}.{old.token}.expired"]

    def test_a_stale_takeover_is_cleared(self, tmp_path: Path) -> None:
        """A takeover file left by an instance that died taking over does not block."""
        old = InstanceLease(tmp_path, "node-a", lease_timeout=10)
        old.take()
        age(old.path, 30)
        (old.folder / TAKEOVER).write_bytes(b"")
        age(old.folder / TAKEOVER, 30)
        new = InstanceLease(tmp_path, "node-a", lease_timeout=10)
        new.take()
        assert new.holds()
        assert not (old.folder / TAKEOVER).exists()

    @pytest.mark.parametrize("name", ["", ".hidden", "a/b", ".."])
    def test_names_must_be_folder_names(self, tmp_path: Path, name: str) -> None:
        """A name that is no plain folder name is a configuration error."""
        with pytest.raises(ConfigError, match="instance: expected a name"):
            InstanceLease(tmp_path, name, lease_timeout=10)


class TestRenew:
    def test_a_renewal_after_a_pause_says_lapsed(self, tmp_path: Path) -> None:
        """Paused past the lease with nobody taking the name: kept, but lapsed (others
        may have adopted its claims); the next renewal is on time."""
        lease = InstanceLease(tmp_path, "node-a", lease_timeout=10)
        lease.take()
        age(lease.path, 30)
        first, second = lease.renew(), lease.renew()
        assert (first.lost, first.lapsed) == (False, True)
        assert (second.lost, second.lapsed) == (False, False)
        found = read_lease(lease.path, "node-a")
        assert found is not None
        assert found.age < 5

    def test_a_removed_lease_is_lost(self, tmp_path: Path) -> None:
        """Its file deleted (a folder tidied by hand): lost."""
        lease = InstanceLease(tmp_path, "node-a", lease_timeout=10)
        lease.take()
        lease.path.unlink()
        assert lease.renew().lost

    def test_the_lease_names_its_holder(self, tmp_path: Path) -> None:
        """The file is JSON naming the instance, its host, pid and token."""
        lease = InstanceLease(tmp_path, "node-a", lease_timeout=10)
        lease.take()
        lease.renew()
        data = json.loads(lease.path.read_text())
        assert data["name"] == "node-a"
        assert data["pid"] == os.getpid()
        assert data["token"] == lease.token
        assert data["renewals"] == 2


class TestRace:
    @pytest.mark.parametrize("expired", [False, True], ids=["fresh", "expired"])
    def test_of_many_starting_at_once_one_takes_the_name(
        self, tmp_path: Path, expired: bool
    ) -> None:
        """Six processes take one name at the same instant (over an expired lease or
        none): exactly one holds it, every other is refused."""
        if expired:
            old = InstanceLease(tmp_path, "node-a", lease_timeout=5)
            old.take()
            age(old.path, 30)
        results = race_for_name([tmp_path] * 6, lease_timeout=5)
        assert results == ["refused"] * 5 + ["took"]
