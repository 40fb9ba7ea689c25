"""The instances that serve one spool, and the lease each holds on its name
(README: Many instances, one spool).

Every instance has a folder `<state_dir>/instances/<name>/` and, while it lives, a
lease file in it, `lease.json`, which names the instance's host, process and a
random token. Two live instances never share a name, even from two hosts whose
`flock`s do not reach each other (sshfs): the lease file is made with an exclusive
create, which every shared file system niftidrop supports keeps exclusive.

The holder renews its lease by writing to the lease file through a descriptor it
keeps open: a write sets the file's mtime by the file system's own clock, and ages
are measured against that same clock (`fs_probe.fs_time`), never against a
host's. A lease older than `lease_timeout` has expired: its instance is dead (or
paused), and a newcomer may take its name by renaming the lease away (of two
renamers one wins) and making its own. An instance that was paused past its lease
and comes back finds another token at its lease's path: `renew` returns False and
the instance must stop acting on the spool. Its writes went to the renamed file
meanwhile, never to the newcomer's. Through a client that caches names (GlusterFS's
FUSE mount, for about a second) it may still see its own lease at the path for that
long: it learns of the loss at its first renewal after the cache expires.

An instance restarted on its host after a crash (systemd, a supervisor) need not
wait out its own lease: the lease names the process that holds it (host, boot,
process namespace, pid and the pid's start time), and a lease whose process is
known, from the same host and namespace, to be gone is taken over at once
(`Lease.died_here`). Elsewhere, a lease is only ever judged by its age.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from niftidrop.errors import ConfigError
from niftidrop.fs_probe import fs_time, make_folder

INSTANCES: Final = "instances"
LEASE: Final = "lease.json"
TAKEOVER: Final = "takeover"
# How long a start waits for another instance's takeover of the same name to end.
TAKE_SECONDS: Final = 10.0
# A lease that was taken over is kept under this suffix until its instance's folder
# is tidied: what it says helps to tell what happened.
EXPIRED_SUFFIX: Final = ".expired"
# The most bytes of a lease file read back: it holds one small JSON object.
_LEASE_BYTES: Final = 4096


@dataclass(frozen=True)
class Lease:
    """What an instance's lease file says, and how old it is by the file system's clock."""

    name: str
    host: str | None
    pid: int | None
    token: str | None
    age: float  # seconds since the holder last renewed it
    process: str | None = None  # `_process_identity()` of its holder

    def live(self, lease_timeout: float) -> bool:
        return self.age <= lease_timeout

    def died_here(self) -> bool:
        """Whether the holder is known to be gone: it ran on this host, in this
        process namespace since the last boot, and its pid is now free or another
        process's (a restart after a crash, where it would otherwise wait out the
        lease). False whenever that cannot be known."""
        if self.process is None or self.pid is None or self.host != socket.gethostname():
            return False
        mine = _process_identity(os.getpid())
        theirs = _process_identity(self.pid)
        if mine is None or self.process.split(":")[:2] != mine.split(":")[:2]:
            return False  # another boot or namespace: nothing is known of its pids
        return theirs != self.process


@dataclass(frozen=True)
class Renewal:
    """What a renewal of a lease found (`InstanceLease.renew`)."""

    lost: bool  # the lease is another instance's now
    lapsed: bool  # it had expired before this renewal


class NameTaken(ConfigError):
    """Another live instance holds the lease on this instance's name."""


class InstanceLease:
    """This instance's lease on its name in `<state_folder>/instances/`.

    `take()` once at start (raises `NameTaken` while another live instance holds
    the name); `renew()` at every heartbeat (it says when the lease was lost or had
    lapsed); `give_up()` at a clean stop.
    """

    def __init__(self, state_folder: Path, name: str, *, lease_timeout: float) -> None:
        if not name or name.startswith(".") or "/" in name:
            raise ConfigError(f"instance: expected a name for a folder, found {name!r}")
        self.root = state_folder / INSTANCES
        self.folder = self.root / name
        self.path = self.folder / LEASE
        self.name = name
        self.lease_timeout = lease_timeout
        self.token = secrets.token_hex(8)
        self._descriptor: int | None = None
        self._renewals = 0

    def __repr__(self) -> str:
        return f"InstanceLease({self.name!r}, held={self._descriptor is not None})"

    def take(self) -> None:
        """Hold the lease on this name: make the lease file, or take it over from an
        instance whose lease has expired. Raises `NameTaken` if one holds it still."""
        make_folder(self.folder, parents=True)
        deadline = time.monotonic() + TAKE_SECONDS
        while not self._create():
            found = read_lease(self.path, self.name)
            if found is None:
                continue  # given up meanwhile: try again
            if found.live(self.lease_timeout) and not found.died_here():
                raise NameTaken(
                    f"instance: expected no live instance named {self.name!r}, found one "
                    f"on host {found.host or '?'} (pid {found.pid or '?'}) whose lease was "
                    f"renewed {found.age:.0f} s ago (lease_timeout {self.lease_timeout:g} s); "
                    "give this one another name (README: Many instances, one spool)"
                ) from None
            if self._take_over(found):
                return
            if time.monotonic() > deadline:
                raise NameTaken(
                    f"instance: another instance named {self.name!r} is taking over its "
                    "expired lease at the same time; give each instance its own name"
                )
            time.sleep(0.1)

    def renew(self) -> Renewal:
        """Renew the lease. `lost`: it is no longer this instance's (taken over while
        this instance was paused, or removed) and the instance must stop; `lapsed`:
        it had expired before this renewal (the instance was paused), so others may
        have adopted its claims."""
        if self._descriptor is None:
            return Renewal(lost=True, lapsed=True)
        found = read_lease(self.path, self.name)
        if found is None or found.token != self.token:
            return Renewal(lost=True, lapsed=True)
        self._write()
        return Renewal(lost=False, lapsed=not found.live(self.lease_timeout))

    def holds(self) -> bool:
        """Whether the lease file at this name's path is still this instance's."""
        found = read_lease(self.path, self.name)
        return found is not None and found.token == self.token

    def give_up(self) -> None:
        """Remove the lease (at a clean stop), if it is still this instance's."""
        if self._descriptor is None:
            return
        with contextlib.suppress(OSError):
            if self.holds():
                self.path.unlink()
        os.close(self._descriptor)
        self._descriptor = None

    def _write(self) -> None:
        """Rewrite the lease in place through the held descriptor: its mtime is now,
        by the file system's clock. Were the file renamed away (taken over), this
        writes to the renamed file, never to the path's new one."""
        assert self._descriptor is not None
        self._renewals += 1
        text = json.dumps(
            {
                "name": self.name,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "process": _process_identity(os.getpid()),
                "renewals": self._renewals,
            }
        ).encode()
        # Padded to one length: a renewal never leaves the end of a longer one behind.
        os.pwrite(self._descriptor, text.ljust(_LEASE_BYTES // 4), 0)

    def _create(self) -> bool:
        """Make the lease file, exclusively; False if one exists."""
        descriptor = create_exclusive(self.path)
        if descriptor is None:
            return False
        self._descriptor = descriptor
        self._write()
        return True

    def _take_over(self, expired: Lease) -> bool:
        """Replace the `expired` lease with this instance's, under the takeover file
        (made exclusively: of two instances taking over at once, one does, and the
        other then finds a live lease). False if another takeover is in progress."""
        takeover = self.folder / TAKEOVER
        descriptor = create_exclusive(takeover)
        if descriptor is None:
            self._clear_stale(takeover)
            return False
        os.close(descriptor)
        try:
            again = read_lease(self.path, self.name)
            if again is not None and again.token == expired.token:
                retired = self.folder / f"{LEASE}.{expired.token or 'unknown'}{EXPIRED_SUFFIX}"
                self.path.rename(retired)
            return self._create()
        finally:
            with contextlib.suppress(FileNotFoundError):
                takeover.unlink()

    def _clear_stale(self, takeover: Path) -> None:
        """Remove a takeover file left by an instance that died taking over."""
        with contextlib.suppress(FileNotFoundError):
            if fs_time(self.folder) - takeover.stat().st_mtime > self.lease_timeout:
                takeover.unlink()


def create_exclusive(path: Path) -> int | None:
    """A descriptor of the new file `path`, made with an exclusive create; None if
    a file has that name. sshfs answers a create that lost a race with EPERM, not
    EEXIST: a refusal is taken for "exists" when the name exists then."""
    try:
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    except PermissionError:
        if os.path.lexists(path):
            return None
        raise


def read_lease(path: Path, name: str, *, now: float | None = None) -> Lease | None:
    """The lease in `path` (of instance `name`), or None if there is none; `now` is
    the file system's time (read from `path`'s folder when not given)."""
    try:
        with path.open("rb") as file:
            mtime = os.fstat(file.fileno()).st_mtime
            text = file.read(_LEASE_BYTES)
    except FileNotFoundError:
        return None
    try:
        data: dict[str, Any] = json.loads(text.decode().strip() or "{}")
    except (UnicodeDecodeError, ValueError):
        data = {}  # a lease being written: its age still counts
    if now is None:
        now = fs_time(path.parent)
    return Lease(
        name=name,
        host=data.get("host") if isinstance(data.get("host"), str) else None,
        pid=data.get("pid") if isinstance(data.get("pid"), int) else None,
        token=data.get("token") if isinstance(data.get("token"), str) else None,
        age=max(0.0, now - mtime),
        process=data.get("process") if isinstance(data.get("process"), str) else None,
    )


def _process_identity(pid: int) -> str | None:
    """`<boot id>:<pid namespace>:<pid>:<start time>` of process `pid`, or None when
    it is not running (or this system does not say). Two processes with the same
    identity are one: a pid that was reused has another start time."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = Path("/proc/self/ns/pid").stat().st_ino
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, the start time field 22 (proc(5)).
    return f"{boot}:{namespace}:{pid}:{fields[19]}"


def leases(state_folder: Path) -> list[Lease]:
    """The lease of every instance that has one in `state_folder`, by name."""
    root = state_folder / INSTANCES
    try:
        names = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    except FileNotFoundError:
        return []
    now = fs_time(root)
    found = [read_lease(root / name / LEASE, name, now=now) for name in names]
    return [lease for lease in found if lease is not None]


def default_name() -> str:
    """An instance's name unless configured: this host's name."""
    return socket.gethostname() or "niftidrop"
