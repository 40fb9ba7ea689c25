"""The long fuzz profile: hostile inbox files through readiness, opening and conversion.

Runs the fuzz tests of `tests/unit/test_fuzz_inputs.py` with `--examples` files in all
(drawn at random, unlike the fixed set `make test` runs), split over `--jobs`
processes, keeps going past findings (each file that breaks the property is saved
under `--findings`) and reports examples run, findings and time. Not part of a plain
`python -m benchmarks`: it runs only when named (`python -m benchmarks fuzz`,
`make fuzz`).

    python -m benchmarks.bench_fuzz [--examples 200000] [--jobs 2] [--findings DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests" / "unit" / "test_fuzz_inputs.py"
# Only when named: it takes tens of minutes.
ON_REQUEST = True


def run_jobs(examples: int, jobs: int, findings: Path, work: Path) -> list[dict[str, Any]]:
    """Start `jobs` pytest processes of `examples / jobs` examples each; their reports."""
    started = []
    for number in range(jobs):
        report = work / f"report-{number}.json"
        environment = {
            **os.environ,
            "FUZZ_EXAMPLES": str(examples // jobs),
            "FUZZ_REPORT": str(report),
            "FUZZ_FINDINGS": str(findings / f"job{number}"),
        }
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["-o", "timeout=0", "-s", str(TESTS)]
        log = (work / f"pytest-{number}.log").open("w")
        started.append((subprocess.Popen(command, env=environment, stdout=log, stderr=log), report))
    reports = []
    for process, report in started:
        process.wait()
        if report.exists():
            reports.append(json.loads(report.read_text()))
        else:
            reports.append({"examples": 0, "findings": [f"job failed: see {report.parent}"]})
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200_000, help="fuzzed files in all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument(
        "--findings", type=Path, default=Path("fuzz-findings"), help="where findings are saved"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="niftidrop-bench-fuzz-") as temporary:
        reports = run_jobs(
            args.examples, max(1, args.jobs), args.findings.resolve(), Path(temporary)
        )
        if any(report["examples"] == 0 for report in reports):
            for log in sorted(Path(temporary).glob("pytest-*.log")):
                print(log.read_text()[-3000:])
    seconds = time.perf_counter() - start
    examples = sum(report["examples"] for report in reports)
    findings = [finding for report in reports for finding in report["findings"]]
    outcomes: Counter[str] = Counter()
    for report in reports:
        outcomes.update(report.get("outcomes", {}))
    print("| fuzzed files | findings | seconds | files/s |")
    print("|---:|---:|---:|---:|")
    print(f"| {examples} | {len(findings)} | {seconds:.0f} | {examples / seconds:.0f} |")
    print("\noutcomes (readiness verdicts, conversion results):")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome}: {count}")
    for finding in findings:
        print(f"finding: {finding}")
    if findings:
        print(f"\nthe files are in {args.findings}")
    return 1 if findings or examples < args.examples * 0.99 else 0


if __name__ == "__main__":
    sys.exit(main())
