"""One instance whose spool is on a shared file system (README, "Many instances, one
spool"): GlusterFS, sshfs, and sshfs without hard links (where inputs are copied into
archive and failed). Every input ends once in archive or failed, every output holds
its input's voxels, and nothing is left claimed or half-written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import drop_by_rename, files_in, output_of, prediction, write_reference

from chaos import Chaos
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


KILLED_AT = Path(__file__).resolve().parent.parent / "killed_at.py"
FAST = ["--settle-seconds", "0.1", "--heartbeat-interval", "0.5", "--log-format", "json"]


def niftidrop(
    root: Path, name: str, *args: str, killed_at: str | None = None, stopped_at: str | None = None
) -> list[str]:
    """The command line of instance `name` on mount point `root`: killed (SIGKILL) or
    stopped (SIGSTOP) at a protocol step if asked."""
    head = [sys.executable, "-m", "niftidrop"]
    if killed_at:
        head = [sys.executable, str(KILLED_AT), killed_at]
    elif stopped_at:
        head = [sys.executable, str(KILLED_AT), "--stop", stopped_at]
    return [*head, *args, "--root", str(root), "--instance", name, *FAST]


@pytest.mark.parametrize("kind", ["gluster", "sshfs"])
class TestTwoInstances:
    """Two instances, one per mount of one shared file system (separate clients, as
    separate hosts would be)."""

    def test_killed_restarted_left_dead_and_paused(self, kind: Kind, tmp_path: Path) -> None:
        """300 inputs in bursts while the instances are killed (the whole process
        group), some restarted at once, some left dead until the survivor adopted
        their claims, and one paused past its lease: every input once, outputs exact."""
        with shared_fs(kind, tmp_path / "fs", mounts=2) as mounts:
            chaos = Chaos(mounts, tmp_path / "logs", lease_timeout=4)
            report = chaos.run(300, bursts=6, kills=6)
            assert chaos.audit() == [], report
            assert report.zombies == 1
            assert report.events["claim_adopted"] >= 1, report.events

    def test_a_crash_between_the_archive_link_and_the_release(
        self, kind: Kind, tmp_path: Path
    ) -> None:
        """Killed with the input linked into archive and not yet unlinked, on one
        mount; the other instance adopts the claim once the lease has expired and
        finishes the move (sshfs: without link counts or shared inode numbers), so
        archive holds the input once."""
        with shared_fs(kind, tmp_path / "fs", mounts=2) as (first, second):
            write_reference(first / "library" / "case.nii.gz")
            (first / "inbox").mkdir()
            drop_by_rename(first / "inbox", "case_1.npy", prediction(1))
            lease = ["--lease-timeout", "2"]
            command = niftidrop(first, "node-a", "run", "--once", *lease, killed_at="input_unlink")
            crashed = subprocess.run(
                command, capture_output=True, timeout=120, start_new_session=True, check=False
            )
            assert crashed.returncode == -9, crashed.stderr
            assert files_in(second / "archive") == ["case_1.npy"]
            time.sleep(3)  # past node-a's lease
            _adopt_and_finish(second, lease)

    @pytest.mark.parametrize("at", ["move_record_commit", "input_link", "input_unlink"])
    def test_paused_in_the_move_past_its_lease(self, kind: Kind, at: str, tmp_path: Path) -> None:
        """Stopped (SIGSTOP) at a step of the move into archive, on one mount, past its
        lease; the other instance adopts the claim and finishes it; then the first
        one is continued: archive holds the input once, and the first one gives the
        claim up (`claim_lost`)."""
        with shared_fs(kind, tmp_path / "fs", mounts=2) as (first, second):
            write_reference(first / "library" / "case.nii.gz")
            (first / "inbox").mkdir()
            drop_by_rename(first / "inbox", "case_1.npy", prediction(1))
            lease = ["--lease-timeout", "2"]
            paused = subprocess.Popen(
                niftidrop(first, "node-a", "run", "--once", *lease, stopped_at=at),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True,
            )  # fmt: skip
            try:
                _wait_until_stopped(paused.pid)
                time.sleep(3)  # past node-a's lease
                _adopt_and_finish(second, lease)
            finally:
                os.killpg(paused.pid, signal.SIGCONT)
                try:
                    out, err = paused.communicate(timeout=120)
                except BaseException:  # never left behind, stopped or not
                    os.killpg(paused.pid, signal.SIGKILL)
                    raise
            assert '"claim_lost"' in out, out + err
            assert files_in(second / "archive") == ["case_1.npy"], out + err

    def test_one_name_on_two_mounts_the_second_exits_2(self, kind: Kind, tmp_path: Path) -> None:
        """The same instance name started on both mounts: the second is refused."""
        with shared_fs(kind, tmp_path / "fs", mounts=2) as (first, second):
            (first / "inbox").mkdir()
            (first / "library").mkdir()
            running = subprocess.Popen(
                niftidrop(first, "node-a", "run"), stdout=subprocess.PIPE, text=True
            )
            try:
                assert running.stdout is not None
                for line in running.stdout:
                    if '"service_ready"' in line:
                        break
                refused = subprocess.run(
                    niftidrop(second, "node-a", "run"),
                    capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
            finally:
                running.terminate()
                running.communicate(timeout=60)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            assert "no live instance named 'node-a'" in refused.stdout + refused.stderr


def _adopt_and_finish(root: Path, lease: list[str]) -> None:
    """`run --once` of node-b on mount point `root`: it adopts node-a's one claim and
    finishes it, so archive holds the input once and its output is exact."""
    done = subprocess.run(
        niftidrop(root, "node-b", "run", "--once", *lease),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line[:1] == "{"]
    adopted = [event for event in events if event["event"] == "claim_adopted"]
    assert [(e["instance"], e["count"]) for e in adopted] == [("node-a", 1)], done.stdout
    assert files_in(root / "archive") == ["case_1.npy"], done.stdout
    assert np.array_equal(output_of(root, "case_1.npy"), prediction(1))
    state = root / "inbox" / ".niftidrop" / "instances"
    assert [p for p in files_in(state) if "/claimed/" in p] == []


def _wait_until_stopped(pid: int) -> None:
    """Until process `pid` is stopped (state T in /proc)."""
    for _ in range(1200):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "T":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} was never stopped")
