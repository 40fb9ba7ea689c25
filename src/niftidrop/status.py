"""What `niftidrop status --json` reports (README: Running the service), built once for
the command and for the status page's `/api/status`.

The report is the folder counts (each at the top level, and all of them under
`counts`), this spool's heartbeat (its age and the state it
says) and `instances`: one entry per instance that serves, or served, the spool
(README: Many instances, one spool), each with its name, host, pid, heartbeat
age, whether it is live or its lease expired, its state and its claims.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from niftidrop.claiming import holds_input
from niftidrop.claims import CLAIMS, HEARTBEAT, read_json
from niftidrop.instances import INSTANCES, LEASE, Lease, read_lease
from niftidrop.spool import Spool


def service_state(heartbeat: Mapping[str, Any] | None) -> str | None:
    """What a heartbeat says: "running", "stopped", or None (no heartbeat)."""
    if heartbeat is None:
        return None
    return str(heartbeat.get("state", "running"))


def status_report(spool: Spool, counts: Mapping[str, int | None]) -> dict[str, Any]:
    """The `status --json` object for `spool`, with the folder `counts` given (walked
    by the command, kept in memory by the service; None: not counted yet)."""
    age = spool.heartbeat_age(time.time())
    heartbeat = read_json(spool.heartbeat_path) if age is not None else None
    state = service_state(heartbeat) if age is not None else None
    return {
        **counts,
        "heartbeat_age": age,
        "state": state,
        "instances": instances_report(spool),
        # Also under one key: `/api/status` gives `failed` as the list of failed inputs.
        "counts": dict(counts),
    }


def instances_report(spool: Spool) -> list[dict[str, Any]]:
    """One entry per instance with a folder in the state folder, by name: its host,
    pid, heartbeat age, whether its lease is live or
    expired, the state its heartbeat says and the claims it holds."""
    root = spool.state / INSTANCES
    try:
        names = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []
    # Read only (status writes nothing): ages by this host's clock, not the file
    # system's, which only a file written would tell (the service's decisions use it).
    now = time.time()
    found = []
    for name in names:
        if name.startswith("."):
            continue
        folder = root / name
        lease = read_lease(folder / LEASE, name, now=now)
        heartbeat = read_json(folder / HEARTBEAT)
        if lease is None and heartbeat is None:
            continue  # made, never run
        heartbeat = heartbeat or {}
        found.append(
            {
                "name": name,
                "host": (lease.host if lease else None) or heartbeat.get("host"),
                "pid": (lease.pid if lease else None) or heartbeat.get("pid"),
                "heartbeat_age": _age(lease, folder / HEARTBEAT, now),
                "live": lease is not None and lease.live(spool.lease_timeout),
                "state": "stopped" if lease is None else service_state(heartbeat) or "running",
                CLAIMS: sum(1 for _ in _holding(folder / CLAIMS)),
            }
        )
    return found


def _age(lease: Lease | None, heartbeat: Path, now: float) -> float | None:
    """Seconds since the instance last renewed its lease, or (stopped: no lease)
    since its last heartbeat."""
    if lease is not None:
        return round(lease.age, 3)
    try:
        return round(max(0.0, now - heartbeat.stat().st_mtime), 3)
    except OSError:
        return None


def _holding(folder: Path) -> list[Path]:
    """The claim folders in `folder` that hold an input."""
    try:
        entries = [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    return [entry for entry in entries if holds_input(entry)]
