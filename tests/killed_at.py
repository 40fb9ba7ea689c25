"""`python tests/killed_at.py [--stop] STEP ARGS...`: `niftidrop ARGS...` that kills
its own process group with SIGKILL at the first occurrence of protocol step STEP
(see niftidrop.steps): a crash exactly there, for tests on real processes. With
`--stop` the group is stopped with SIGSTOP instead (a pause there, until a SIGCONT)."""

from __future__ import annotations

import os
import signal
import sys
import time

from niftidrop.cli import main
from niftidrop.steps import hooked


def signal_at(wanted: str, number: signal.Signals, args: list[str]) -> None:
    fired = False

    def hook(name: str) -> None:
        nonlocal fired
        if name == wanted and not fired:
            fired = True
            os.killpg(0, number)
            # The stop is taken by one of the process's threads, perhaps another
            # one, while this one runs on for a moment: it waits here meanwhile, so
            # the step is not done before the stop (and 1 s after a SIGCONT).
            time.sleep(1.0)

    with hooked(hook):
        main(args)
    if not fired:
        sys.exit(f"step {wanted} was never reached")


if __name__ == "__main__":
    if sys.argv[1] == "--stop":
        signal_at(sys.argv[2], signal.SIGSTOP, sys.argv[3:])
    else:
        signal_at(sys.argv[1], signal.SIGKILL, sys.argv[2:])
