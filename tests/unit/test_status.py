"""Tests for niftidrop.status: the `status --json` report, from the command and in code."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from niftidrop.cli import main
from niftidrop.settings import Settings
from niftidrop.spool import Spool
from niftidrop.status import service_state, status_report
from niftidrop.usage import ExitCode
from spools import drop

COUNTS = {"inbox": 1, "claimed": 2, "outbox": 3, "archive": 4, "failed": 5}


class TestServiceState:
    def test_no_heartbeat_is_none(self) -> None:
        """No heartbeat: no state."""
        assert service_state(None) is None

    def test_state_is_read_and_running_by_default(self) -> None:
        """The heartbeat's `state`, or "running" for a heartbeat without one."""
        assert service_state({"state": "stopped"}) == "stopped"
        assert service_state({}) == "running"


class TestStatusReport:
    def test_without_heartbeat_there_is_no_instance(self, spool: Spool) -> None:
        """A spool no service ran on: the counts, no heartbeat, no instance."""
        report = status_report(spool, COUNTS)
        assert report == {
            **COUNTS,
            "heartbeat_age": None,
            "state": None,
            "instances": [],
            "counts": COUNTS,
        }

    def test_each_instance_is_listed_with_its_lease_and_claims(
        self, spool: Spool, settings: Settings
    ) -> None:
        """A live instance (its lease held) and one whose lease expired are both
        listed, by name, with host, pid, heartbeat age, state and claims in flight."""
        spool.lock()
        try:
            spool.write_heartbeat({"pid": 42, "state": "running"})
            other = Spool(settings.model_copy(update={"instance": "b-node"}))
            other.create_folders()
            other.lock()
            drop(other, "case.npy")
            other.claim(other.inbox / "case.npy")
            old = time.time() - 90  # past the 60 s lease_timeout status judges by
            os.utime(other.lease.path, (old, old))
            report = status_report(spool, COUNTS)
        finally:
            spool.unlock()
        expired, live = report["instances"]
        assert (expired["name"], live["name"]) == ("b-node", spool.instance)
        assert live["host"] == socket.gethostname()
        assert live["pid"] == os.getpid()
        assert (live["live"], live["state"], live["claimed"]) == (True, "running", 0)
        assert live["heartbeat_age"] == pytest.approx(0, abs=2)
        assert (expired["live"], expired["claimed"]) == (False, 1)
        assert expired["heartbeat_age"] == pytest.approx(90, abs=2)

    def test_a_stopped_instance_is_listed_by_its_heartbeat(self, spool: Spool) -> None:
        """A clean stop gives up the lease: the heartbeat still tells its age and state."""
        spool.lock()
        spool.write_heartbeat({"pid": 1, "host": "node-7", "state": "stopped"})
        spool.unlock()
        [instance] = status_report(spool, COUNTS)["instances"]
        assert (instance["host"], instance["live"], instance["state"]) == (
            "node-7",
            False,
            "stopped",
        )


class TestCommand:
    def test_status_json_has_counts_and_instances(
        self, spool: Spool, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`status --json` is the report: counts at the top and under `counts`, instances."""
        spool.write_heartbeat({"pid": 7, "host": "here", "state": "stopped"})
        root = str(spool.inbox.parent)
        assert main(["status", "--json", "--root", root]) == ExitCode.OK
        report = json.loads(capsys.readouterr().out)
        assert report["counts"] == {name: report[name] for name in COUNTS}
        assert [item["name"] for item in report["instances"]] == [spool.instance]
        assert report["state"] == "stopped"

    def test_status_text_lists_the_folders_and_instances(
        self, spool: Spool, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Plain `status` prints the five folders, the heartbeat line and one line per
        instance, nothing else."""
        spool.write_heartbeat({"pid": 7})
        assert main(["status", "--root", str(spool.inbox.parent)]) == ExitCode.OK
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == [*COUNTS, "heartbeat", "instance"]
        assert lines[-2].endswith("(running)")
        assert lines[-1].startswith(f"instance  {spool.instance} on ")
