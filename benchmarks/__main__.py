"""Run every `benchmarks/bench_*.py` in one go, or only those named.

python -m benchmarks                 # all of them (but those run only on request)
python -m benchmarks convert library # bench_convert and bench_library
python -m benchmarks fuzz            # the long fuzz profile: only when named
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


def on_request(name: str) -> bool:
    """A benchmark that says `ON_REQUEST = True` (too long for every run) runs only when named."""
    module = importlib.import_module(f"benchmarks.bench_{name}")
    return bool(getattr(module, "ON_REQUEST", False))


def main(argv: Sequence[str]) -> int:
    names = list(argv) or [name for name in available() if not on_request(name)]
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
