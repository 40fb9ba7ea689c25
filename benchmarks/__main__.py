"""Run every `benchmarks/bench_*.py` in one go, or only those named.

python -m benchmarks                 # all of them
python -m benchmarks convert library # bench_convert and bench_library
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path


def available() -> list[str]:
    """The benchmark names, from the `bench_<name>.py` files next to this one."""
    folder = Path(__file__).resolve().parent
    return sorted(path.stem.removeprefix("bench_") for path in folder.glob("bench_*.py"))


def main(argv: Sequence[str]) -> int:
    names = list(argv) or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}")
        return 2
    status = 0
    for name in names:
        print(f"\n## {name}\n", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        status = max(status, int(module.main([])))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
