"""What `niftidrop status --json` reports (README: Running the service), built once for
the command and for the status page's `/api/status`.

The report is the folder counts (each at the top level, and all of them under
`counts`), this spool's heartbeat (its age and the state it
says) and `instances`: one entry per service instance on the spool, each with its
name, host, pid, state, heartbeat age and claims. One instance serves a spool
today, so the list holds the one whose heartbeat is in the state folder (none
when no service ever ran); the shape is the one many instances will fill.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from typing import Any

from niftidrop.claims import CLAIMS, read_json
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
    instances = []
    if age is not None:
        details = heartbeat or {}
        host = str(details.get("host") or socket.gethostname())
        instances.append(
            {
                # Until instances have names of their own, an instance is its host.
                "name": str(details.get("instance") or host),
                "host": host,
                "pid": details.get("pid"),
                "state": state,
                "heartbeat_age": age,
                CLAIMS: counts.get(CLAIMS, 0),
            }
        )
    return {
        **counts,
        "heartbeat_age": age,
        "state": state,
        "instances": instances,
        # Also under one key: `/api/status` gives `failed` as the list of failed inputs.
        "counts": dict(counts),
    }
