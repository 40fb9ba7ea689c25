"""Structured logs (README: Logs): one JSON object per line on stdout, or a console view.

Every line carries `timestamp` (ISO 8601, UTC), `level` and `event`. With
`log_format = "auto"` a terminal gets the coloured console renderer and anything
else (journald, `docker logs`, a pipe) gets JSON lines. A console line puts the
fields a reader looks for first (`CONSOLE_FIRST`); a JSON line keeps the order the
code gave them.

While a `ProgressBar` is open, every log line is written above it: the bar is
cleared, the line written whole, the bar drawn again, so the bar stays on the
terminal's bottom line and leaves no copies of itself in the scrollback.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Final, Literal, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

LOGGER_NAME = "niftidrop"

# After timestamp, level and event, a console line starts with these fields (those
# present, in this order); the others follow in the order the code gave them.
CONSOLE_FIRST: Final = ("input", "output", "reference", "error", "reason")

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Held while a line is written and while a bar opens or closes, so that no line
# lands on the bar's row. Reentrant: a log line goes through `ProgressBar.write`.
_write_lock = threading.RLock()
_open_bars: list[ProgressBar] = []  # newest last; lines are written above it


def use_console(log_format: LogFormat, stream: TextIO) -> bool:
    """Whether `log_format` means the console renderer on `stream`."""
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return log_format == "console"


def console_order(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """The event's fields with `CONSOLE_FIRST` moved to the front (a processor)."""
    first = {key: event_dict.pop(key) for key in CONSOLE_FIRST if key in event_dict}
    return {**first, **event_dict}


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
        processors += [console_order, structlog.dev.ConsoleRenderer(sort_keys=False)]
    else:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(default=str),
        ]
    writer = LineWriter(output)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[log_level]),
        logger_factory=lambda *_: writer,
        # Tests reconfigure (capture_logs) after loggers exist; caching would pin them.
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Any:
    """The niftidrop logger, bound to `initial` fields."""
    return structlog.get_logger(LOGGER_NAME, **initial)


class LineWriter:
    """What structlog writes rendered lines to: one whole line per call on `stream`,
    above the open progress bar if there is one."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __repr__(self) -> str:
        return f"LineWriter({self.stream!r})"

    def msg(self, message: str) -> None:
        """Write `message` and a newline."""
        with _write_lock:
            if _open_bars:
                _open_bars[-1].write(message, self.stream)
            else:
                self.stream.write(message + "\n")
                self.stream.flush()

    # structlog calls the method named after the level.
    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class ProgressBar:
    """A progress bar (tqdm) on a terminal's bottom line, with log lines above it.

    `stream` (default: stderr) should be a terminal: the caller decides whether to
    draw one. `leave`: keep the finished bar on screen when it closes, else erase it.
    """

    def __init__(
        self, total: int, *, stream: TextIO | None = None, leave: bool = True, unit: str = "file"
    ) -> None:
        from tqdm import tqdm  # only a terminal needs it

        with _write_lock:
            self._bar: Any = tqdm(
                total=total,
                unit=unit,
                file=stream if stream is not None else sys.stderr,
                leave=leave,
                dynamic_ncols=True,  # follows the terminal's width
            )
            _open_bars.append(self)

    def __repr__(self) -> str:
        return f"ProgressBar({self._bar.n}/{self._bar.total})"

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, done: int = 1) -> None:
        """Count `done` more units (thread-safe)."""
        self._bar.update(done)

    def write(self, line: str, stream: TextIO | None = None) -> None:
        """Write `line` whole above the bar, on `stream` (default: stdout)."""
        output = stream if stream is not None else sys.stdout
        bar = self._bar
        with _write_lock, bar.get_lock():  # the bar's lock: worker threads update it
            bar.clear(nolock=True)
            # The bar and the line may be two streams to one terminal: each is
            # flushed before the other writes, so the terminal gets them in order.
            bar.fp.flush()
            output.write(line + "\n")
            output.flush()
            bar.refresh(nolock=True)

    def close(self) -> None:
        """Finish the bar (kept or erased, see `leave`); lines are written plainly again."""
        with _write_lock:
            if self in _open_bars:
                _open_bars.remove(self)
            self._bar.close()
            self._bar.fp.flush()
