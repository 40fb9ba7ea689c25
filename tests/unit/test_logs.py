"""Tests of the log set-up: JSON lines with timestamp, level and event (SPEC §7)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog

from niftidrop.logs import configure_logging, get_logger, use_console


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
