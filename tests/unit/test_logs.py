"""Tests of the log set-up: JSON lines with timestamp, level and event (README: Logs), the
console view, and log lines above the progress bar."""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog

from niftidrop.logs import CONSOLE_FIRST, ProgressBar, configure_logging, get_logger, use_console
from terminal import Screen, is_log_line

# A fake terminal has no width: wide enough that no line wraps.
WIDE = 100_000
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# As JobRunner logs a conversion: the order the code gives its fields in.
CONVERTED = {
    "input": "site/case001_pred.npy",
    "reference": "/srv/spool/library/case001.nii.gz",
    "rule": "reference_prefix",
    "output": "/srv/spool/outbox/site/case001_pred.nii.gz",
    "shape": [512, 512, 230],
    "dtype_in": "int64",
    "dtype_out": "uint8",
    "bytes_in": 482344960,
    "bytes_out": 1062938,
    "seconds": 0.41,
}


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


class TestFormat:
    def test_json_lines_carry_timestamp_level_and_event(self) -> None:
        """Each line is one JSON object with an ISO UTC timestamp, level and event."""
        stream = io.StringIO()
        configure_logging("json", "info", stream)
        get_logger().info("input_converted", input="a.npy", shape=[2, 3])
        (line,) = stream.getvalue().splitlines()
        record = json.loads(line)
        assert record["event"] == "input_converted"
        assert record["level"] == "info"
        assert record["input"] == "a.npy"
        assert record["timestamp"].endswith("Z")
        assert datetime.fromisoformat(record["timestamp"]).utcoffset() is not None

    def test_level_filters(self) -> None:
        """Lines below log_level are dropped."""
        stream = io.StringIO()
        configure_logging("json", "warning", stream)
        get_logger().info("quiet")
        get_logger().warning("loud")
        assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["loud"]

    def test_auto_is_console_on_a_terminal_and_json_elsewhere(self) -> None:
        """log_format = auto: console renderer on a terminal, JSON on a pipe."""
        assert use_console("auto", FakeTerminal())
        assert not use_console("auto", io.StringIO())
        assert use_console("console", io.StringIO())
        assert not use_console("json", FakeTerminal())

    def test_console_renderer_is_not_json(self) -> None:
        """The console format is for people: not a JSON object."""
        stream = FakeTerminal()
        configure_logging("auto", "info", stream)
        get_logger().info("service_ready", inbox="x")
        text = stream.getvalue()
        assert "service_ready" in text
        assert not text.lstrip().startswith("{")

    def test_exceptions_are_rendered_inside_the_json_line(self) -> None:
        """A logged exception stays within its one JSON line."""
        stream = io.StringIO()
        configure_logging("json", "info", stream)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            get_logger().exception("job_crashed")
        (line,) = stream.getvalue().splitlines()
        assert "boom" in json.dumps(json.loads(line)["exception"])


def console_keys(line: str) -> list[str]:
    """The field names of a console line, in the order shown."""
    return re.findall(r" ([a-z_]+)=", ANSI.sub("", line))


class TestConsoleOrder:
    def test_key_fields_come_first_then_the_rest_as_given(self) -> None:
        """A console input_converted line shows input, output, reference first, then the
        other fields in the code's order (not sorted)."""
        stream = FakeTerminal()
        configure_logging("console", "info", stream)
        get_logger().info("input_converted", **CONVERTED)
        line = ANSI.sub("", stream.getvalue())
        assert re.match(r"\S+Z \[info\s*\] input_converted +input=", line)
        shown = "input output reference rule shape dtype_in dtype_out bytes_in bytes_out seconds"
        assert console_keys(line) == shown.split()

    def test_error_code_and_reason_follow_the_input(self) -> None:
        """A failure shows input and error code before its long message; a reason follows
        the input."""
        stream = FakeTerminal()
        configure_logging("console", "info", stream)
        log = get_logger()
        log.warning("input_failed", input="a.npy", error="truncated", message="m", failed_as="f")
        log.warning("input_incomplete", input="b.npy", reason="incomplete: 8 bytes")
        failed, incomplete = stream.getvalue().splitlines()
        assert console_keys(failed) == ["input", "error", "message", "failed_as"]
        assert console_keys(incomplete) == ["input", "reason"]
        assert list(CONSOLE_FIRST[:2]) == ["input", "output"]

    def test_json_lines_keep_their_fields_and_order(self) -> None:
        """JSON lines are not reordered and gain no field: the code's fields, then
        event, level and timestamp."""
        stream = io.StringIO()
        configure_logging("json", "info", stream)
        get_logger().info("input_converted", **CONVERTED)
        record = json.loads(stream.getvalue())
        assert list(record) == [*CONVERTED, "event", "level", "timestamp"]


class TestProgressBar:
    def test_log_lines_go_above_the_bar(self) -> None:
        """Lines logged while a bar is open are whole lines above it; the bar stays on
        the bottom line and nowhere else."""
        terminal = FakeTerminal()
        configure_logging("console", "info", terminal)
        with ProgressBar(3, stream=terminal) as bar:
            for number in range(3):
                get_logger().info("input_converted", **{**CONVERTED, "input": f"{number}.npy"})
                bar.update()
        lines = Screen(WIDE).feed(terminal.getvalue()).lines()
        assert [is_log_line(line) for line in lines] == [True, True, True, False]
        assert [console_keys(line)[:2] for line in lines[:3]] == [["input", "output"]] * 3
        assert "3/3" in lines[-1]

    def test_an_erased_bar_leaves_only_the_log_lines(self) -> None:
        """`leave=False`: once closed, nothing of the bar is left on screen."""
        terminal = FakeTerminal()
        configure_logging("console", "info", terminal)
        bar = ProgressBar(2, stream=terminal, leave=False)
        get_logger().info("service_ready", inbox="/srv/spool/inbox", backlog=2)
        bar.update(2)
        bar.close()
        get_logger().info("service_stopped", converted=2, failed=0, deferred=0, incomplete=0)
        lines = Screen(WIDE).feed(terminal.getvalue()).lines()
        assert len(lines) == 2
        assert all(is_log_line(line) for line in lines)

    def test_lines_stay_whole_while_another_thread_moves_the_bar(self) -> None:
        """Worker threads advance the bar while the main thread logs: no line is cut
        by a redraw of the bar."""
        terminal = FakeTerminal()
        configure_logging("json", "info", terminal)
        total = 400
        with ProgressBar(total, stream=terminal, leave=False) as bar:

            def advance() -> None:
                for _ in range(total):
                    bar.update()

            workers = [threading.Thread(target=advance) for _ in range(2)]
            for worker in workers:
                worker.start()
            for number in range(200):
                get_logger().info("input_converted", **{**CONVERTED, "input": f"{number}.npy"})
            for worker in workers:
                worker.join()
        lines = Screen(WIDE).feed(terminal.getvalue()).lines()
        assert [json.loads(line)["input"] for line in lines] == [f"{n}.npy" for n in range(200)]

    def test_lines_are_plain_once_the_bar_is_closed(self) -> None:
        """After the bar closes, a log line is written alone, with no redraw around it."""
        terminal = FakeTerminal()
        configure_logging("json", "info", terminal)
        ProgressBar(1, stream=terminal, leave=False).close()
        before = len(terminal.getvalue())
        get_logger().info("service_stopped", converted=0)
        assert terminal.getvalue()[before:].count("\n") == 1
        assert terminal.getvalue()[before:].startswith("{")
