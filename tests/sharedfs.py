"""Real shared file systems for the tests (README, "Many instances, one spool"):
GlusterFS and sshfs, each mounted several times on this host by
`deploy/sharedfs.sh`, every mount a client with its own caches, as separate hosts
would have. Needs root (mounts, network namespaces, servers) and installs the
Debian packages it lacks."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "sharedfs.sh"
Kind = Literal["gluster", "sshfs"]
KINDS: tuple[Kind, ...] = ("gluster", "sshfs")


@contextmanager
def shared_fs(
    kind: Kind, folder: Path, mounts: int = 2, *, sshfs_options: str = ""
) -> Iterator[list[Path]]:
    """`mounts` mount points of one new `kind` file system whose server lives in
    `folder` (sshfs mounted with `sshfs_options` too); everything is unmounted,
    stopped and removed on the way out."""
    if os.geteuid() != 0:
        pytest.skip("mounting a shared file system needs root")
    try:
        started = subprocess.run(
            ["bash", str(SCRIPT), "up", kind, str(folder), str(mounts)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "SHAREDFS_SSHFS_OPTIONS": sshfs_options},
            timeout=600,  # the first run installs the Debian packages
        )
    except subprocess.CalledProcessError as error:
        raise AssertionError(f"{SCRIPT.name} up {kind} failed: {error.stderr}") from None
    try:
        yield [Path(line) for line in started.stdout.split()]
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(folder)], check=True, timeout=120)
