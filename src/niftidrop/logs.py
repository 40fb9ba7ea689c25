"""Structured logs (README: Logs): one JSON object per line on stdout, or a console view.

Every line carries `timestamp` (ISO 8601, UTC), `level` and `event`. With
`log_format = "auto"` a terminal gets the coloured console renderer and anything
else (journald, `docker logs`, a pipe) gets JSON lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

LOGGER_NAME = "niftidrop"

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def use_console(log_format: LogFormat, stream: TextIO) -> bool:
    """Whether `log_format` means the console renderer on `stream`."""
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return log_format == "console"


def configure_logging(
    log_format: LogFormat = "auto", log_level: LogLevel = "info", stream: TextIO | None = None
) -> None:
    """Route every niftidrop log line to `stream` (default: stdout) in the chosen format."""
    output = stream if stream is not None else sys.stdout
    console = use_console(log_format, output)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    if console:
        processors.append(structlog.dev.ConsoleRenderer())
    else:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(default=str),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[log_level]),
        logger_factory=structlog.PrintLoggerFactory(file=output),
        # Tests reconfigure (capture_logs) after loggers exist; caching would pin them.
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Any:
    """The niftidrop logger, bound to `initial` fields."""
    return structlog.get_logger(LOGGER_NAME, **initial)
