"""The spool under a running service (README: File protocol): put back, or stop.

What the service holds at start (its inbox, its state folder and the lease on
its instance's name) can be removed or replaced under it. `SpoolGuard.check`,
run with every heartbeat, renews the lease, makes a removed state folder, claims
folder or lease again and stops the service when its inbox is gone or replaced,
or when another instance took its name over (README: Many instances, one spool).
"""

from __future__ import annotations

import contextlib
import os
import stat

from niftidrop.errors import ServiceError
from niftidrop.logs import get_logger
from niftidrop.spool import Spool

log = get_logger()


class SpoolGuard:
    """The identity of a spool's inbox taken at start, and the check of it and the lease."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._identity: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"SpoolGuard({self.spool!r})"

    def start(self) -> None:
        """Take the identities to check against (once the lease is held)."""
        self._identity = self._identities()

    def _identities(self) -> dict[str, tuple[int, int]]:
        """(device, inode) of the inbox (symlinks followed, and whether it is one), as
        taken at start."""
        found = {}
        inbox = self.spool.inbox
        with contextlib.suppress(OSError):
            found["inbox_is_link"] = (int(inbox.is_symlink()), 0)
            found["inbox"] = _identity(inbox.stat())
        return found

    def check(self) -> None:
        """Put back what was removed under the running service, or stop it.

        The lease is renewed. A removed state folder, claims folder or lease is made
        again (the lease taken again). An inbox that is gone, or replaced (renamed
        away and made anew, or made a symlink), cannot be watched or claimed from
        safely any more, nor may an instance whose name another one took over act
        on the spool: ServiceError, so the service exits non-zero and its
        supervisor restarts it.
        """
        inbox = self.spool.inbox
        try:
            is_link = (int(inbox.is_symlink()), 0)
            info = inbox.stat()
        except OSError as error:
            raise ServiceError(f"inbox: {inbox} is gone ({error.strerror})") from None
        expected = self._identity
        if (
            not stat.S_ISDIR(info.st_mode)
            or is_link != expected.get("inbox_is_link", is_link)
            or _identity(info) != expected.get("inbox", _identity(info))
        ):
            raise ServiceError(
                f"inbox: expected the folder {inbox} watched since the start, found it "
                "replaced (moved away, made anew or made a symbolic link)"
            )
        remade = []
        spool = self.spool
        try:
            if not spool.claims_folder.is_dir():
                spool.claims_folder.mkdir(parents=True, exist_ok=True)
                spool.remove_spare_folders()  # they were in the removed folder
                remade.append(str(spool.claims_folder))
            renewal = spool.lease.renew()
            if renewal.lost and not spool.lease.path.exists():
                spool.lease.give_up()
                spool.lease.take()  # NameTaken if another instance took the name meanwhile
                remade.append(str(spool.lease.path))
            elif renewal.lost:
                raise ServiceError(
                    f"instance: expected to hold the lease on the name {spool.instance!r}, "
                    "found another instance holding it (this one was paused past its "
                    "lease_timeout); it stops and leaves everything to that one"
                )
            elif renewal.lapsed:
                log.warning(
                    "lease_lapsed",
                    instance=spool.instance,
                    lease_timeout=spool.lease_timeout,
                    message="paused past its lease: other instances may have adopted claims",
                )
        except (OSError, ValueError) as error:
            raise ServiceError(f"state_dir: cannot make {spool.state} again: {error}") from None
        if remade:
            log.warning("state_recreated", state=str(spool.state), made=remade)


def _identity(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)
