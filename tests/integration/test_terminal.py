"""The real `niftidrop` on a pseudo-terminal: what its user's screen shows (README: Logs)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from support import prediction, save_npy, write_reference

from terminal import Screen, is_log_line, run_on_terminal

INPUTS = 8
BAR = re.compile(r"\d+%\|")  # tqdm's "  40%|████      | 4/10 [...]"


def environment() -> dict[str, str]:
    """The test's environment (no NIFTIDROP_*), and a terminal type as a shell has."""
    return {**os.environ, "TERM": "xterm"}


def niftidrop(*args: str) -> list[str]:
    return [sys.executable, "-m", "niftidrop", *args]


def screen_of(root: Path, *args: str) -> tuple[int, str, list[str]]:
    """Exit code, bytes received and the screen's lines of `niftidrop ARGS` on a terminal."""
    code, received = run_on_terminal(niftidrop(*args), env=environment())
    return code, received, Screen().feed(received).lines()


class TestRunOnce:
    def test_log_lines_are_whole_and_the_bar_leaves_no_trace(self, root: Path) -> None:
        """`run --once` on a terminal draws its bar, writes every log line whole above
        it, and erases it at the end: the screen holds log lines only, the last one
        `service_stopped` with the counts."""
        for number in range(INPUTS):
            save_npy(root / "inbox" / f"case_{number}.npy", prediction(number))
        save_npy(root / "inbox" / "orphan.npy", prediction(0))  # no reference: fails
        (root / "inbox" / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00")  # incomplete
        code, received, lines = screen_of(
            root,
            "run",
            "--once",
            "--root",
            str(root),
            "--settle-seconds",
            "0.3",
            "--workers",
            "2",
            "--no-fsync",
        )
        assert code == 1, received
        assert BAR.search(received), "no progress bar was drawn"
        bad = [line for line in lines if not is_log_line(line)]
        assert not bad, f"lines that are not whole log lines: {bad}"
        converted = [line for line in lines if " input_converted " in line]
        assert len(converted) == INPUTS
        for line in converted:
            # Key fields first, and the line complete to its last field.
            assert re.search(r" input_converted +input=case_\d\.npy output=\S+ reference=", line)
            assert re.search(r" seconds=[\d.e-]+$", line)
        assert any(" input_failed " in line and "error=no_reference" in line for line in lines)
        assert any(
            " input_incomplete " in line and "input=cut.npy reason=" in line for line in lines
        )
        assert " service_stopped " in lines[-1]
        assert lines[-1].endswith(f"converted={INPUTS} failed=1 deferred=0 incomplete=1")


class TestConvert:
    def test_result_lines_above_the_bar_which_stays_last(self, tmp_path: Path) -> None:
        """`convert` of several files on a terminal: one whole line per input, and the
        finished bar only on the last line."""
        reference = write_reference(tmp_path / "reference.nii.gz")
        inputs = [str(save_npy(tmp_path / f"in_{n}.npy", prediction(n))) for n in range(4)]
        out = tmp_path / "out"
        code, received, lines = screen_of(
            tmp_path, "convert", *inputs, "--reference", str(reference), "-o", str(out)
        )
        assert code == 0, received
        assert lines[:-1] == [f"{path} -> {out / Path(path).stem}.nii.gz" for path in inputs]
        assert BAR.search(lines[-1])
        assert "4/4" in lines[-1]
