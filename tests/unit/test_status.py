"""Tests for niftidrop.status: the `status --json` report, from the command and in code."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from niftidrop.cli import main
from niftidrop.spool import Spool
from niftidrop.status import service_state, status_report
from niftidrop.usage import ExitCode

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

    def test_the_heartbeat_makes_one_instance(self, spool: Spool) -> None:
        """The heartbeat's host, pid and state become the one instance, with its claims."""
        spool.write_heartbeat({"pid": 42, "host": "node-7", "state": "running"})
        old = time.time() - 3
        os.utime(spool.heartbeat_path, (old, old))
        report = status_report(spool, COUNTS)
        [instance] = report["instances"]
        assert instance["name"] == instance["host"] == "node-7"
        assert instance["pid"] == 42
        assert instance["state"] == report["state"] == "running"
        assert instance["claimed"] == 2
        assert instance["heartbeat_age"] == report["heartbeat_age"] == pytest.approx(3, abs=1)

    def test_a_heartbeat_without_host_is_this_host(self, spool: Spool) -> None:
        """A heartbeat written before hosts were recorded names this host."""
        spool.write_heartbeat({"pid": 1})
        [instance] = status_report(spool, COUNTS)["instances"]
        assert instance["host"] == socket.gethostname()


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
        assert [item["name"] for item in report["instances"]] == ["here"]
        assert report["state"] == "stopped"

    def test_status_text_lists_only_the_folders(
        self, spool: Spool, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Plain `status` prints the five folders and the heartbeat line, nothing else."""
        spool.write_heartbeat({"pid": 7})
        assert main(["status", "--root", str(spool.inbox.parent)]) == ExitCode.OK
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == [*COUNTS, "heartbeat"]
        assert lines[-1].endswith("(running)")
