"""Processes racing for one instance name (README: Many instances, one spool), for
tests/unit/test_instances.py and the shared file systems' tests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

TAKE_NAME = """
import sys, time
from pathlib import Path
from niftidrop.instances import InstanceLease, NameTaken
lease = InstanceLease(Path(sys.argv[1]), "node-a", lease_timeout=float(sys.argv[3]))
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    lease.take()
except NameTaken:
    print("refused")
else:
    print("took")
    time.sleep(2)  # hold it while the others try
"""


def race_for_name(folders: Sequence[Path], *, lease_timeout: float) -> list[str]:
    """One process per folder in `folders` takes the name `node-a` there at the same
    instant; what each said ("took" or "refused", or its traceback), sorted."""
    start = time.time() + 2  # every process started and waiting by then
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", TAKE_NAME, str(folder), str(start), str(lease_timeout)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for folder in folders
    ]
    return sorted(racer.communicate(timeout=60)[0].strip() for racer in racers)
