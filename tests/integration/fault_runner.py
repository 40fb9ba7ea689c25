"""The kill matrix's runner: `kill -9` of the real service at a chosen step, then a start.

Reads a JSON list of cases `[scenario, step, occurrence]` on stdin. For each, on a
fresh spool: a forked child runs the service (`run --once`, conversions in its
worker thread, so every step happens in this process) with a hook that sends
SIGKILL to itself at that occurrence of that step; then another forked child
starts the service again, without the hook, and the spool is audited. Forking
from this process, which has imported everything once, keeps each case at a few
tens of milliseconds. Prints {"killed": n, "problems": [...]} on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable

from faults import (
    SCENARIOS,
    Faults,
    Scenario,
    audit_final,
    audit_hand_off,
    expected_outputs,
    fast_folder,
    input_digest,
    prepare,
    restart,
)

from niftidrop.settings import Settings
from niftidrop.steps import hooked


class KillAt(Faults):
    """Kill this process at occurrence `occurrence` of step `name`."""

    def __init__(self, scenario: Scenario, name: str, occurrence: int) -> None:
        super().__init__(scenario)
        self.name = name
        self.occurrence = occurrence

    def __call__(self, name: str) -> None:
        if name == self.name and self.trace.count(name) == self.occurrence:
            os.kill(os.getpid(), signal.SIGKILL)
        super().__call__(name)


def in_child(run: Callable[[], int]) -> int:
    """Run `run` in a forked child with its output silenced; its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            quiet = os.open(os.devnull, os.O_WRONLY)
            os.dup2(quiet, 1)
            os.dup2(quiet, 2)
            code = run()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def killed_run(settings: Settings, scenario: Scenario, name: str, occurrence: int) -> int:
    from niftidrop import api
    from niftidrop.service import Service

    with hooked(KillAt(scenario, name, occurrence)):
        Service(settings, convert_file=api.convert_file).run(once=True)
    return 3  # the step was never reached


def run_case(scenario: Scenario, name: str, occurrence: int) -> list[str] | None:
    """Kill at `name` #`occurrence`, start again, audit: the problems (None: not killed)."""
    expected, _ = expected_outputs(scenario)
    data = input_digest(scenario)
    where = f"{scenario.name}: kill at {name} #{occurrence}"
    with fast_folder() as root:
        settings = prepare(root, scenario)
        status = in_child(lambda: killed_run(settings, scenario, name, occurrence))
        if not os.WIFSIGNALED(status) or os.WTERMSIG(status) != signal.SIGKILL:
            return None
        problems = []
        status = in_child(lambda: restart(settings, scenario))
        code = os.waitstatus_to_exitcode(status)
        # 1 when this start failed the input, 0 when the killed one had.
        if code not in ((0, 1) if scenario.rejected else (0,)):
            problems.append(f"the restart exited with {code}")
        problems += audit_final(root, scenario, data, expected, renamed=False)
        if scenario.hooked:
            problems += audit_hand_off(root, delivered=True, twice=name == "event_remove")
        return [f"{where}: {problem}" for problem in problems]


def main() -> int:
    cases = json.load(sys.stdin)
    scenarios = {scenario.name: scenario for scenario in SCENARIOS}
    killed = 0
    problems: list[str] = []
    for scenario_name, name, occurrence in cases:
        found = run_case(scenarios[scenario_name], name, occurrence)
        if found is None:
            problems.append(f"{scenario_name}: kill at {name} #{occurrence}: never reached")
        else:
            killed += 1
            problems += found
    json.dump({"killed": killed, "problems": problems}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
