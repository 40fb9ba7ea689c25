"""One instance whose spool is on a shared file system (README, "Many instances, one
spool"): GlusterFS, sshfs, and sshfs without hard links (where inputs are copied into
archive and failed). Every input ends once in archive or failed, every output holds
its input's voxels, and nothing is left claimed or half-written."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import drop_by_rename, files_in, output_of, prediction, write_reference

from sharedfs import Kind, shared_fs

INPUTS = 12
# kind, extra sshfs options
FILE_SYSTEMS: list[tuple[Kind, str]] = [
    ("gluster", ""),
    ("sshfs", ""),
    ("sshfs", "disable_hardlink"),
]


@pytest.mark.parametrize(("kind", "options"), FILE_SYSTEMS, ids=["gluster", "sshfs", "nolinks"])
class TestOneInstance:
    def test_every_input_once_with_its_output(
        self, kind: Kind, options: str, tmp_path: Path
    ) -> None:
        """`run --once` over good and bad inputs: each in archive or failed once,
        outputs exact, no claim and no temporary file left."""
        with shared_fs(kind, tmp_path / "fs", mounts=1, sshfs_options=options) as (root,):
            write_reference(root / "library" / "case.nii.gz")
            (root / "inbox" / "sub").mkdir(parents=True)
            for number in range(INPUTS):
                drop_by_rename(root / "inbox", f"sub/case_{number}.npy", prediction(number))
            (root / "inbox" / "case_bad.npy").write_bytes(b"not an array")
            command = [sys.executable, "-m", "niftidrop", "run", "--once", "--root", str(root)]
            command += ["--settle-seconds", "0.1", "--log-format", "json", "--workers", "2"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 1, done.stderr  # the bad one failed
            events = [json.loads(line) for line in done.stdout.splitlines()]
            stopped = next(event for event in events if event["event"] == "service_stopped")
            assert (stopped["converted"], stopped["failed"]) == (INPUTS, 1)
            expected = [f"sub/case_{number}.npy" for number in range(INPUTS)]
            assert files_in(root / "archive") == sorted(expected)
            assert files_in(root / "failed") == ["case_bad.npy", "case_bad.npy.error.json"]
            for number, relative in enumerate(expected):
                assert np.array_equal(output_of(root, relative), prediction(number))
            state = root / "inbox" / ".niftidrop"
            assert [path for path in files_in(root / "inbox") if ".niftidrop/" not in path] == []
            assert files_in(state / "instances" / socket.gethostname() / "claimed") == []
            everywhere = files_in(root)
            assert [path for path in everywhere if path.endswith(".tmp")] == []
