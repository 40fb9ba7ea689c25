"""Systematic fault injection into the file protocol (README, "Faults covered").

Every file-system step of an input's life announces itself to `niftidrop.steps`.
The errno matrix raises each errno at each step, in this process, then lets the
input be handled again without the fault; the kill matrix kills the service
(`kill -9`) at each step and starts it again (`fault_runner.py`). After each: the
input is in exactly one place, outputs are whole and delivered once with the
same bytes, no temporary file or claim is left, and a transient fault never
sends a convertible input to failed.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest
from faults import (
    ERRNOS,
    SCENARIOS,
    Faults,
    Scenario,
    audit_consistent,
    audit_final,
    audit_hand_off,
    expected_outputs,
    fast_folder,
    input_digest,
    live,
    prepare,
    raising,
    retry,
)

from niftidrop.names import is_temp_name
from niftidrop.spool import Spool
from niftidrop.steps import STEPS, hooked

RUNNER = Path(__file__).with_name("fault_runner.py")
HEARTBEAT_STEPS = {name for name in STEPS if name.startswith("heartbeat_")}
# The producer's write into the inbox: its faults are tested in tests/unit/test_drop.py.
DROP_STEPS = {name for name in STEPS if name.startswith("drop_")}
# Taken by the service's deliveries, not by an input's life (`live`): killed on their own.
DELIVERY_STEPS = {"event_remove"}


@cache
def golden(scenario: Scenario) -> tuple[dict[str, str], tuple[str, ...]]:
    outputs, trace = expected_outputs(scenario)
    return outputs, tuple(trace)


def first_occurrences() -> list[tuple[Scenario, str, int]]:
    """Each step at its first occurrence in the first scenario that takes it."""
    seen: dict[str, tuple[Scenario, str, int]] = {}
    for scenario in SCENARIOS:
        for index, name in enumerate(golden(scenario)[1]):
            seen.setdefault(name, (scenario, name, index))
    return list(seen.values())


def errno_case(scenario: Scenario, at: int, code: int) -> list[str]:
    """Raise `code` at step number `at`, audit, handle again without it, audit."""
    expected, trace = golden(scenario)
    data = input_digest(scenario)
    with fast_folder() as root:
        settings = prepare(root, scenario)
        life = live(settings, scenario, Faults(scenario, at=at, fault=raising(code)))
        where = f"{scenario.name}: {errno.errorcode[code]} at step {at} ({trace[at]})"
        problems = audit_consistent(root, scenario, data)
        retry(life, scenario)
        problems += audit_final(root, scenario, data, expected, renamed=code == errno.EEXIST)
        if scenario.hooked:
            problems += audit_hand_off(root, delivered=False)
        return [f"{where}: {problem}" for problem in problems]


class TestRegistry:
    def test_every_step_is_taken_by_some_scenario(self) -> None:
        """A new step without a scenario that reaches it fails here: the matrix is whole."""
        taken = {name for scenario in SCENARIOS for name in golden(scenario)[1]}
        assert taken | HEARTBEAT_STEPS | DROP_STEPS | DELIVERY_STEPS == set(STEPS)

    def test_an_unregistered_step_name_is_caught(self) -> None:
        """Every name the protocol announces is in the registry."""
        for scenario in SCENARIOS:
            assert set(golden(scenario)[1]) <= set(STEPS)


class TestErrnos:
    @pytest.mark.parametrize("code", ERRNOS, ids=[errno.errorcode[code] for code in ERRNOS])
    def test_each_errno_at_each_step(self, code: int) -> None:
        """Every step (first taken) with this errno: consistent, then converted once."""
        problems = []
        for scenario, _, index in first_occurrences():
            problems += errno_case(scenario, index, code)
        assert problems == []

    @pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.name for scenario in SCENARIOS])
    def test_a_full_disk_at_every_step_of_a_life(self, scenario: Scenario) -> None:
        """ENOSPC at every step occurrence of this scenario's life (each fsync, each
        record write): never failed, finished once the space is back."""
        problems = []
        for index in range(len(golden(scenario)[1])):
            problems += errno_case(scenario, index, errno.ENOSPC)
        assert problems == []

    @pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS])
    @pytest.mark.parametrize("name", sorted(HEARTBEAT_STEPS))
    def test_a_heartbeat_that_cannot_be_written_leaves_nothing(self, code: int, name: str) -> None:
        """A full or broken state folder: the old heartbeat stays, no temporary is left."""
        with fast_folder() as root:
            spool = Spool(prepare(root, SCENARIOS[0]))
            spool.create_folders()
            spool.write_heartbeat({"pid": 1})

            def fault(step: str) -> None:
                if step == name:
                    raising(code)(step)

            with hooked(fault), pytest.raises(OSError, match="injected"):
                spool.write_heartbeat({"pid": 2})
            assert json.loads(spool.heartbeat_path.read_text())["pid"] == 1
            assert not [path for path in spool.state.iterdir() if is_temp_name(path.name)]


def kill_cases() -> list[tuple[str, str, int]]:
    """(scenario, step, occurrence of that step): every step, at each of its
    occurrences in the first scenario that takes it, the heartbeat's, and each
    step of three whole lives (archived, failed, and the copy fallback's)."""
    cases: dict[tuple[str, str, int], None] = {}
    for scenario, name, _ in first_occurrences():
        for occurrence in range(golden(scenario)[1].count(name)):
            cases[(scenario.name, name, occurrence)] = None
    for name in sorted(HEARTBEAT_STEPS):  # the service writes one as it starts
        cases[("archived", name, 0)] = None
    for name in sorted(DELIVERY_STEPS):
        cases[("hooked", name, 0)] = None
    for scenario in SCENARIOS:
        if scenario.name in ("archived", "copied", "failed", "hooked"):
            trace = golden(scenario)[1]
            for index, name in enumerate(trace):
                cases[(scenario.name, name, trace[:index].count(name))] = None
    return list(cases)


# With on_conflict = rename, a kill after the outputs got their names and before
# `.converted.json` is written: the restart recognises its outputs by the inodes in
# `.committing.json` instead of adding `case-1.nii.gz`.
KNOWN_GAPS = [
    ("renamed", name, 0)
    for name in (
        "converted_record_create",
        "converted_record_write",
        "converted_record_fsync",
        "converted_record_commit",
    )
]
RUNNERS = 6  # each case mostly waits on the service's loop: several run side by side


def run_kills(cases: list[tuple[str, str, int]]) -> tuple[int, list[str]]:
    """Run the cases in RUNNERS runner processes; (cases killed, problems)."""
    # The runner imports the tests' helpers (integration/ is its own folder; tests/ is not).
    helpers = os.pathsep.join(
        filter(None, [str(RUNNER.parent.parent), os.environ.get("PYTHONPATH")])
    )
    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": helpers}
    chunks = [cases[number::RUNNERS] for number in range(RUNNERS)]
    runners = []
    for chunk in chunks:
        with tempfile.TemporaryFile("w+") as given:
            json.dump(chunk, given)
            given.seek(0)
            runners.append(
                subprocess.Popen(
                    [sys.executable, str(RUNNER)],
                    stdin=given,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=environment,
                    cwd=RUNNER.parent,
                )
            )
    killed, problems = 0, []
    for runner in runners:
        out, err = runner.communicate(timeout=100)
        assert runner.returncode == 0, err[-4000:]
        report = json.loads(out)
        killed += report["killed"]
        problems += report["problems"]
    return killed, problems


class TestKills:
    def test_kill_9_at_every_step_then_restart(self) -> None:
        """The service killed at each step; the next start finishes the input exactly once."""
        cases = [case for case in kill_cases() if case not in KNOWN_GAPS]
        killed, problems = run_kills(cases)
        assert problems == []
        assert killed == len(cases)

    def test_kill_9_between_archiving_and_the_hook(self) -> None:
        """Killed with the input archived and its event kept (before the unlink, after it,
        after the delivery): the hook still runs after the restart, for the same event."""
        cases = [("hooked", name, 0) for name in ("input_unlink", "release", "event_remove")]
        killed, problems = run_kills(cases)
        assert killed == len(cases)
        assert problems == []

    def test_kill_9_before_the_converted_record_with_rename(self) -> None:
        """on_conflict = rename, killed between the outputs' commit and the record: once."""
        killed, problems = run_kills(KNOWN_GAPS)
        assert killed == len(KNOWN_GAPS)
        assert problems == []
