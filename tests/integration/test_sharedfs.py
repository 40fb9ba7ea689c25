"""The shared file systems the many-instance tests run on (README, "Many instances,
one spool"), as `deploy/sharedfs.sh` brings them up: what each gives across its
clients, which is what the spool's protocol may and may not rely on, and that
tearing one down leaves nothing behind."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from leases import race_for_name
from niftidrop.fs_probe import missing, probe
from niftidrop.instances import InstanceLease, NameTaken, read_lease
from sharedfs import KINDS, Kind, shared_fs
from waiting import wait_until


def mounted(folder: Path) -> list[str]:
    """The mount points under `folder` this host has."""
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return [point for point in points if point.startswith(str(folder))]


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def running(folder: Path) -> list[str]:
    """Command lines of the processes that name `folder` (servers, clients)."""
    command = ["ps", "-ww", "-eo", "args"]
    listing = subprocess.run(command, capture_output=True, text=True, check=True)
    return [line for line in listing.stdout.splitlines() if str(folder) in line]


@pytest.mark.parametrize("kind", KINDS)
class TestAcrossClients:
    def test_a_file_written_on_one_mount_is_read_on_another(
        self, kind: Kind, tmp_path: Path
    ) -> None:
        """What one client writes and renames, another lists and reads at once."""
        with shared_fs(kind, tmp_path / "fs") as (first, second):
            (first / "inbox").mkdir()
            (first / "inbox" / ".a.tmp").write_bytes(b"prediction")
            (first / "inbox" / ".a.tmp").rename(first / "inbox" / "a.npy")
            assert [path.name for path in (second / "inbox").iterdir()] == ["a.npy"]
            assert (second / "inbox" / "a.npy").read_bytes() == b"prediction"

    def test_of_two_renames_of_one_file_exactly_one_wins(self, kind: Kind, tmp_path: Path) -> None:
        """A claim by rename: two clients renaming one input, one succeeds, one fails."""
        with shared_fs(kind, tmp_path / "fs") as (first, second):
            for number in range(20):
                (first / f"in{number}").write_bytes(b"x")
                results = []
                for mount, name in ((first, "mine"), (second, "yours")):
                    try:
                        (mount / f"in{number}").rename(mount / f"{name}{number}")
                        results.append(name)
                    except FileNotFoundError:
                        pass
                assert results == ["mine"]
                assert names(second) == names(first)

    def test_exclusive_create_is_exclusive_across_clients(self, kind: Kind, tmp_path: Path) -> None:
        """O_EXCL: the second client's create of the same name fails."""
        with shared_fs(kind, tmp_path / "fs") as (first, second):
            os.close(os.open(first / "lease", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            with pytest.raises(FileExistsError):
                os.open(second / "lease", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


class TestWhatDiffers:
    def test_gluster_shares_locks_and_counts_links(self, tmp_path: Path) -> None:
        """GlusterFS: a flock taken on one client holds on another; st_nlink is right."""
        with shared_fs("gluster", tmp_path / "fs") as (first, second):
            (first / "a").write_bytes(b"x")
            os.link(first / "a", first / "b")
            wait_until(lambda: (second / "a").stat().st_nlink == 2, timeout=5)
            with (first / "lock").open("w") as held, (second / "lock").open("w") as other:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with pytest.raises(BlockingIOError):
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_sshfs_shares_no_locks_and_counts_one_link(self, tmp_path: Path) -> None:
        """sshfs: a flock does not reach the other client; st_nlink is always 1 — the
        two things the spool's protocol must not rely on."""
        with shared_fs("sshfs", tmp_path / "fs") as (first, second):
            (first / "a").write_bytes(b"x")
            os.link(first / "a", first / "b")
            assert (first / "a").stat().st_nlink == 1
            assert (first / "b").read_bytes() == b"x"
            with (first / "lock").open("w") as held, (second / "lock").open("w") as other:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no error: not shared


@pytest.mark.parametrize("kind", KINDS)
class TestTearDown:
    def test_nothing_is_left(self, kind: Kind, tmp_path: Path) -> None:
        """After down: no mount, no process, no namespace, no folder."""
        folder = tmp_path / "fs"
        with shared_fs(kind, folder, mounts=3) as mounts:
            assert len(mounts) == 3
            assert len(mounted(folder)) == 3
            assert running(folder)
        assert mounted(folder) == []
        wait_until(lambda: running(folder) == [], timeout=10)
        namespaces = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        )
        # The script names GlusterFS's namespace after the folder's real path.
        own = "niftidrop-gl-" + hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
        assert own not in namespaces.stdout
        assert not folder.exists()


class TestProbe:
    """What `niftidrop.fs_probe` finds on each shared file system."""

    def test_gluster_gives_everything(self, tmp_path: Path) -> None:
        """GlusterFS: every capability works."""
        with shared_fs("gluster", tmp_path / "fs", mounts=1) as (mount,):
            capabilities = probe(mount)
            assert all(item.works for item in capabilities), capabilities

    def test_sshfs_counts_no_links(self, tmp_path: Path) -> None:
        """sshfs: hard links work but st_nlink is 1; nothing needed is missing."""
        with shared_fs("sshfs", tmp_path / "fs", mounts=1) as (mount,):
            found = {item.name: item.works for item in probe(mount)}
            assert found["hard_links"] is True
            assert found["link_counts"] is False
            assert missing(probe(mount)) == []

    def test_sshfs_without_hard_links(self, tmp_path: Path) -> None:
        """sshfs with disable_hardlink: no hard links (EPERM), which niftidrop copies
        around, so nothing needed is missing; the detail names the errno."""
        with shared_fs("sshfs", tmp_path / "fs", mounts=1, sshfs_options="disable_hardlink") as (
            mount,
        ):
            capabilities = {item.name: item for item in probe(mount)}
            assert capabilities["hard_links"].works is False
            assert "EPERM" in capabilities["hard_links"].detail  # FUSE turns ENOSYS into EPERM
            assert capabilities["link_counts"].works is False
            assert missing(list(capabilities.values())) == []


@pytest.mark.parametrize("kind", KINDS)
class TestLeases:
    """Leases on instance names (`niftidrop.instances`) across clients: the check
    that must not rely on flock, which sshfs does not share."""

    def test_one_name_from_two_mounts_at_once(self, kind: Kind, tmp_path: Path) -> None:
        """Three processes on each of two mounts take one name at the same instant:
        exactly one holds it."""
        with shared_fs(kind, tmp_path / "fs") as mounts:
            results = race_for_name([*mounts, *mounts, *mounts], lease_timeout=60)
            assert results == ["refused"] * 5 + ["took"]

    def test_taken_over_across_clients_once_expired(self, kind: Kind, tmp_path: Path) -> None:
        """A lease held through one mount and not renewed for lease_timeout is taken
        over through the other; the old holder then finds it lost."""
        with shared_fs(kind, tmp_path / "fs") as (first, second):
            old = InstanceLease(first, "node-a", lease_timeout=1)
            old.take()
            with pytest.raises(NameTaken):
                InstanceLease(second, "node-a", lease_timeout=1).take()
            # Older than lease_timeout by the file system's clock, which may count
            # whole seconds only (sshfs) and be read through a cache for a moment.
            wait_until(lambda: (lease := read_lease(old.path, "node-a")) and lease.age > 1)
            new = InstanceLease(second, "node-a", lease_timeout=1)
            new.take()
            # Through its own mount the old holder may still see its lease under the
            # name for as long as that client caches names (about 1 s on GlusterFS).
            wait_until(lambda: old.renew().lost, timeout=10, what="the old holder told")
            assert not new.renew().lost  # (lapsed perhaps: lease_timeout is 1 s here)
            assert new.holds()
