"""`python tests/killed_at.py STEP ARGS...`: `niftidrop ARGS...` that kills its own
process group with SIGKILL at the first occurrence of protocol step STEP (see
niftidrop.steps): a crash exactly there, for tests on real processes."""

from __future__ import annotations

import os
import signal
import sys

from niftidrop.cli import main
from niftidrop.steps import hooked


def kill_at(wanted: str) -> None:
    def hook(name: str) -> None:
        if name == wanted:
            os.killpg(0, signal.SIGKILL)

    with hooked(hook):
        main(sys.argv[2:])
    sys.exit(f"step {wanted} was never reached")


if __name__ == "__main__":
    kill_at(sys.argv[1])
