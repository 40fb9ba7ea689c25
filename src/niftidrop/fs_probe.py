"""What the spool's file system gives, found by trying it (README: Many instances, one spool).

The file protocol needs a few things of the file system that holds the spool, and
network file systems differ in exactly these: a rename that replaces an existing
name, a create that fails when the name exists (`O_EXCL`), hard links (or else
niftidrop copies), link counts that count, and a folder fsync. `probe` tries each in
a scratch folder of the state folder and says, in words, what it saw and what
niftidrop does about it; a missing capability that the protocol cannot do without
is `needed`. `fs_time` reads the file system's own clock, which is what ages of
files on a shared file system must be measured with (the hosts' clocks may differ).
`make_folder` is a `mkdir` that survives another client making the same folder at
the same moment.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PROBE_PREFIX: Final = "probe-"
# GlusterFS answers a mkdir racing another client's mkdir of the same folder (or of
# a parent) with ESTALE: a fresh look finds the folder. Tries, and the pause between.
MKDIR_TRIES: Final = 5
MKDIR_PAUSE_SECONDS: Final = 0.05
# A scratch folder left by a probe that died is removed by a later probe once it is
# this old by the file system's clock: no probe takes that long.
STALE_PROBE_SECONDS: Final = 600.0


@dataclass(frozen=True)
class Capability:
    """One thing the file protocol asks of the file system, as tried."""

    name: str
    works: bool
    needed: bool  # without it the protocol cannot keep its guarantees
    detail: str  # what was seen, and what niftidrop does about it


def probe(state_folder: Path) -> list[Capability]:
    """Try each capability in a scratch folder of `state_folder` (which must exist
    and be writable: an OSError says so), and remove the folder again."""
    _remove_stale_probes(state_folder)
    scratch = state_folder / f"{PROBE_PREFIX}{secrets.token_hex(8)}"
    scratch.mkdir()
    try:
        return [check(scratch) for check in _CHECKS]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def missing(capabilities: list[Capability]) -> list[str]:
    """One message for each needed capability that does not work."""
    return [
        f"{item.name}: {item.detail}" for item in capabilities if item.needed and not item.works
    ]


def make_folder(folder: Path, *, parents: bool = False) -> None:
    """`folder.mkdir(parents=parents, exist_ok=True)`, tried again while a shared file
    system says ESTALE (another client made it, or a parent, at the same moment)."""
    for tries in range(1, MKDIR_TRIES + 1):
        try:
            folder.mkdir(parents=parents, exist_ok=True)
            return
        except OSError as error:
            if error.errno != errno.ESTALE or tries == MKDIR_TRIES:
                raise
        time.sleep(MKDIR_PAUSE_SECONDS)


def fs_time(folder: Path) -> float:
    """The file system's clock now, in seconds since the epoch: the mtime of a file
    just written in `folder` (the server's clock on a network file system)."""
    path = folder / f".clock-{secrets.token_hex(8)}"
    try:
        path.write_bytes(b"")
        return path.stat().st_mtime
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_stale_probes(state_folder: Path) -> None:
    """Remove scratch folders of probes that died, once they are surely not in use."""
    leftovers = [path for path in state_folder.glob(f"{PROBE_PREFIX}*") if path.is_dir()]
    if not leftovers:
        return
    now = fs_time(state_folder)
    for path in leftovers:
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > STALE_PROBE_SECONDS:
                shutil.rmtree(path)


def _rename_replaces(scratch: Path) -> Capability:
    source, target = scratch / "source", scratch / "target"
    source.write_bytes(b"new")
    target.write_bytes(b"old")
    try:
        source.replace(target)
    except OSError as error:
        return Capability(
            "rename_replaces",
            False,
            True,
            f"a rename onto an existing name failed ({_reason(error)}); outputs are "
            "replaced and claims taken by rename",
        )
    works = target.read_bytes() == b"new" and not source.exists()
    seen = "the name now holds the new file" if works else "the old file or the source remained"
    return Capability("rename_replaces", works, True, f"a rename onto an existing name: {seen}")


def _exclusive_create(scratch: Path) -> Capability:
    path = scratch / "exclusive"
    path.write_bytes(b"")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return Capability(
            "exclusive_create", True, True, "a create (O_EXCL) of an existing name fails"
        )
    except OSError as error:
        return Capability(
            "exclusive_create", False, True, f"a create (O_EXCL) failed: {_reason(error)}"
        )
    return Capability(
        "exclusive_create",
        False,
        True,
        "a create (O_EXCL) of an existing name succeeded: two instances could both "
        "believe they made the same file",
    )


def _hard_links(scratch: Path) -> Capability:
    source, link = scratch / "linked", scratch / "link"
    source.write_bytes(b"x")
    try:
        os.link(source, link)
    except OSError as error:
        return Capability(
            "hard_links",
            False,
            False,
            f"a hard link failed ({_reason(error)}): inputs are copied into archive and "
            "failed instead of linked (slower for large inputs)",
        )
    return Capability("hard_links", True, False, "a hard link works")


def _link_counts(scratch: Path) -> Capability:
    source, link = scratch / "counted", scratch / "counted-link"
    source.write_bytes(b"x")
    try:
        os.link(source, link)
    except OSError:
        return Capability("link_counts", False, False, "no hard links, so no link counts")
    count = source.stat().st_nlink
    if count == 2:
        return Capability("link_counts", True, False, "st_nlink counts hard links")
    return Capability(
        "link_counts",
        False,
        False,
        f"st_nlink is {count} for a file with two names (some network file systems "
        "always report 1)",
    )


def _folder_fsync(scratch: Path) -> Capability:
    descriptor = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            return Capability(
                "folder_fsync",
                False,
                False,
                f"fsync of a folder is refused ({_reason(error)}): new names are as "
                "durable as the file system makes them",
            )
        raise
    finally:
        os.close(descriptor)
    # Accepted is all a probe can see: on some (sshfs) it is accepted and does nothing.
    return Capability("folder_fsync", True, False, "fsync of a folder is accepted")


def _reason(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, "")
    return f"{name}: {error.strerror}" if name else str(error)


_CHECKS: Final[tuple[Callable[[Path], Capability], ...]] = (
    _rename_replaces,
    _exclusive_create,
    _hard_links,
    _link_counts,
    _folder_fsync,
)
