"""The spool under a running service (README: File protocol): put back, or stop.

What the service holds at start (its inbox, its state folder and lock) can be
removed or replaced under it. `SpoolGuard.check`, run with every heartbeat,
makes a removed state folder, claims folder or lock file again and stops the
service when its inbox is gone or replaced.
"""

from __future__ import annotations

import contextlib
import os
import stat

from niftidrop.claims import LOCK
from niftidrop.errors import ServiceError
from niftidrop.logs import get_logger
from niftidrop.spool import Spool

log = get_logger()


class SpoolGuard:
    """The identities of a spool's inbox and lock file taken at start, and their check."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._identity: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"SpoolGuard({self.spool!r})"

    def start(self) -> None:
        """Take the identities to check against (once the spool is locked)."""
        self._identity = self._identities()

    def _identities(self) -> dict[str, tuple[int, int]]:
        """(device, inode) of the inbox (symlinks followed, and whether it is one) and
        of the lock file, as taken at start."""
        found = {}
        inbox, lock = self.spool.inbox, self.spool.state / LOCK
        with contextlib.suppress(OSError):
            found["inbox_is_link"] = (int(inbox.is_symlink()), 0)
            found["inbox"] = _identity(inbox.stat())
            found["lock"] = _identity(lock.stat())
        return found

    def check(self) -> None:
        """Put back what was removed under the running service, or stop it.

        A removed state folder, claims folder or lock file is made again (the lock
        taken again). An inbox that is gone, or replaced (renamed away and made
        anew, or made a symlink), cannot be watched or claimed from safely any more:
        ServiceError, so the service exits non-zero and its supervisor restarts it.
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
        try:
            if not self.spool.claims_folder.is_dir():
                self.spool.claims_folder.mkdir(parents=True, exist_ok=True)
                self.spool.remove_spare_folders()  # they were in the removed folder
                remade.append(str(self.spool.claims_folder))
            lock = self.spool.state / LOCK
            lock_info = lock.stat() if lock.exists() else None
            if lock_info is None or _identity(lock_info) != expected.get("lock"):
                self.spool.unlock()
                self.spool.lock()  # ConfigError if another service took the folder
                self._identity = self._identities()
                remade.append(str(lock))
        except (OSError, ValueError) as error:
            state = self.spool.state
            raise ServiceError(f"state_dir: cannot make {state} again: {error}") from None
        if remade:
            log.warning("state_recreated", state=str(self.spool.state), made=remade)


def _identity(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)
