"""Conversions in child processes, `workers` of them, lent to the worker threads in turn.

Why not in the worker threads themselves: a conversion is mostly Python between
short system calls and NumPy or igzip work, and the interpreter lock lets one
thread at a time run Python, handing it over around every system call. Child
processes convert side by side on every CPU (about 1.4x the files per second of
threads on 2 CPUs; see the README). They also contain a failure: a conversion
that crashes the interpreter or is killed for lack of memory ends its child,
not the service, and its input stays claimed and is retried.

The child is `python -m niftidrop.processes <parent pid>`. Its stdin carries
first its limits (`{"max_memory": bytes}`), then pickled requests (positional
and keyword arguments of `convert_file`; a `settings` that is the object the
last request carried is sent as SAME_SETTINGS, which saves pickling it both
ways for every input); its stdout pickled replies (`("ok",
result)`, `("error", exception)` for a rejection or an environmental error, or
`("crashed", text)` for any other exception); it starts with `("ready", pid)`.
What it reports on its own (a traceback, a limit it could not set) are JSON
lines on its stderr, which the parent hands to `on_output`; anything else a
library prints goes there too. It ignores SIGINT and SIGTERM (the service
decides when a conversion may be cut short), exits when its stdin closes, and
is killed by the kernel when its parent dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import faulthandler
import json
import os
import pickle
import resource
import select
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Final

from niftidrop.errors import NiftidropError

READY: Final = "ready"
OK: Final = "ok"
ERROR: Final = "error"
CRASHED: Final = "crashed"
# Stands for the last request's `settings` (see above).
SAME_SETTINGS: Final = "same settings as the last request"
_PR_SET_PDEATHSIG: Final = 1
# The kernel's OOM killer picks the process with the highest score: a child
# converting a huge input, rather than the service that holds every claim.
_OOM_SCORE_ADJ: Final = "500"
# Exit status of a child whose own loop failed (it reported why on stderr).
_CHILD_FAILED: Final = 70

# Called with the child's pid and what it reported: its JSON object (an
# `event` and fields), or `{"output": text}` for plain text.
OutputHandler = Callable[[int, Mapping[str, Any]], None]


class ConversionCrashed(ChildProcessError):
    """A conversion did not end in a result or a rejection: its process died (a
    signal, the OOM killer, `max_memory`), ran over its time limit, or the
    conversion raised an unexpected exception. The message says which."""


class ConversionProcess:
    """One child process running `niftidrop.api.convert_file`, one call at a time.

    One thread at a time calls it (`niftidrop.workers.SharedProcesses` lends it);
    only `kill()` may be called from another meanwhile.
    A child that dies is started again at the next call; the call it died in
    (or was killed in after `timeout` seconds) raises `ConversionCrashed`.
    `max_memory` caps the child's private memory (RLIMIT_DATA: its heap and
    anonymous mappings, not the read-only file mappings inputs are read
    through), so a conversion that needs more fails with MemoryError. With
    `on_output`, what the child reports on stderr is handed to it instead of
    reaching this process's stderr.
    """

    def __init__(
        self,
        *,
        max_memory: int | None = None,
        timeout: float | None = None,
        on_output: OutputHandler | None = None,
    ) -> None:
        self.max_memory = max_memory
        self.timeout = timeout
        self._on_output = on_output
        self._child: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._ready = False
        self._settings_sent: object = None  # held, so its id() is not reused

    def __repr__(self) -> str:
        return f"ConversionProcess(pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """The child's process id (None before it starts or after it ended)."""
        return None if self._child is None else self._child.pid

    def start(self) -> None:
        """Start the child without waiting for it (see `wait_ready`)."""
        # -P: the working directory is not put on the module path (nothing in it
        # can stand in for a module).
        child = subprocess.Popen(
            [sys.executable, "-P", "-m", "niftidrop.processes", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if self._on_output is None else subprocess.PIPE,
        )
        self._child, self._ready, self._settings_sent = child, False, None
        if self._on_output is not None:
            self._reader = threading.Thread(
                target=_forward_output,
                args=(child.pid, _stream(child.stderr), self._on_output),
                name=f"niftidrop-process-{child.pid}-output",
                daemon=True,
            )
            self._reader.start()
        limits = pickle.dumps({"max_memory": self.max_memory})
        with contextlib.suppress(OSError):  # a child dead already: `wait_ready` says so
            _send(_stream(child.stdin), limits)

    def wait_ready(self) -> None:
        """Wait until the child has imported the converter; ChildProcessError if it died."""
        child = self._running()
        reply = self._receive(child)
        if reply != (READY, child.pid):
            self._end_child()
            raise ChildProcessError(f"conversion process: expected {READY!r}, got {reply!r}")
        self._ready = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """`convert_file(*args, **kwargs)` in the child: its result, or its exception."""
        if self._child is None or self._child.poll() is not None:
            self.start()
        if not self._ready:
            self.wait_ready()
        child = self._running()
        settings = kwargs.get("settings")
        if settings is not None and settings is self._settings_sent:
            kwargs = {**kwargs, "settings": SAME_SETTINGS}
        request = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            _send(_stream(child.stdin), request)
        except OSError:  # a broken pipe: the child is gone
            raise self._ended(child) from None
        self._settings_sent = settings
        if not _readable(_stream(child.stdout), self.timeout):
            self._end_child()
            raise ConversionCrashed(
                f"conversion process {child.pid} killed after {self.timeout:g} s "
                "(conversion_timeout)"
            )
        status, value = self._receive(child)
        if status == ERROR:
            raise value
        if status == CRASHED:
            raise ConversionCrashed(f"conversion raised {value}")
        return value

    def close(self, timeout: float = 5.0) -> None:
        """Let the child finish its call and exit; kill it after `timeout` seconds."""
        child, self._child = self._child, None
        if child is None:
            return
        with contextlib.suppress(OSError):
            _stream(child.stdin).close()
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        self._close_streams(child)

    def kill(self) -> None:
        """Kill the child at once (a forced stop: its conversion is abandoned).

        Safe from any thread: it only sends the signal. A call under way in the
        owning thread sees the child die and raises `ConversionCrashed`; the
        owner (or `close()`) reaps it.
        """
        child = self._child
        if child is not None and child.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGKILL)

    def _running(self) -> subprocess.Popen[bytes]:
        if self._child is None:
            raise ChildProcessError("conversion process: not started")
        return self._child

    def _receive(self, child: subprocess.Popen[bytes]) -> Any:
        """The child's next reply; ConversionCrashed (and the child ended) if it died."""
        try:
            return pickle.load(_stream(child.stdout))
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._ended(child) from None

    def _ended(self, child: subprocess.Popen[bytes]) -> ConversionCrashed:
        """End the child (if it is not yet reaped) and say how it ended."""
        self._end_child()
        status = child.wait()  # known even if another thread ended it
        return ConversionCrashed(f"conversion process {child.pid} ended ({_describe(status)})")

    def _end_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        with contextlib.suppress(OSError):
            child.kill()
        child.wait()
        self._close_streams(child)

    def _close_streams(self, child: subprocess.Popen[bytes]) -> None:
        """Close the pipes of a reaped child, once its last output was handed on."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.join(timeout=5.0)  # its stderr ends with it (unless a grandchild holds it)
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _readable(stream: IO[bytes], timeout: float | None) -> bool:
    """Whether the child's reply (or its end) arrives within `timeout` seconds."""
    if timeout is None:
        return True
    poller = select.poll()
    poller.register(stream.fileno(), select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _forward_output(pid: int, stream: IO[bytes], on_output: OutputHandler) -> None:
    """Hand what the child writes to stderr to `on_output` (a thread per child).

    A JSON object line is what the child reported; other lines are passed on as
    text, those that arrived together (a traceback) as one.
    """
    fd, partial = stream.fileno(), b""
    with contextlib.suppress(OSError):  # the pipe closed under it
        while chunk := os.read(fd, 65536):
            *lines, partial = (partial + chunk).split(b"\n")
            _hand_on(pid, lines, on_output)
    _hand_on(pid, [partial], on_output)


def _hand_on(pid: int, lines: list[bytes], on_output: OutputHandler) -> None:
    text: list[str] = []
    reports: list[Mapping[str, Any]] = []
    for raw in lines:
        line = raw.decode(errors="replace").rstrip()
        report = _report(line)
        if report is None:
            if line.strip():
                text.append(line)
            continue
        if text:
            reports.append({"output": "\n".join(text)})
            text = []
        reports.append(report)
    if text:
        reports.append({"output": "\n".join(text)})
    for each in reports:
        # The pipe must be drained whatever the handler does, or the child blocks.
        with contextlib.suppress(Exception):
            on_output(pid, each)


def _report(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        report = json.loads(line)
    except ValueError:
        return None
    return report if isinstance(report, dict) and "event" in report else None


def _send(stream: IO[bytes], message: bytes) -> None:
    stream.write(message)
    stream.flush()


def _stream(stream: IO[bytes] | None) -> IO[bytes]:
    if stream is None:  # pragma: no cover - both pipes are always requested
        raise ChildProcessError("conversion process: no pipe")
    return stream


def _describe(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:  # a real-time signal has no name of its own
            return f"killed by signal {-status}"
    return f"exit status {status}"


# The child.


def serve(parent: int) -> int:
    """The child's loop: requests from stdin, replies on stdout, until stdin closes."""
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The pipes are kept for the protocol; stray prints of any library go to stderr.
    requests = os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, sys.stdin.fileno())
    os.close(nothing)
    # A fatal signal (SIGSEGV in a C library) prints where it struck, for the log.
    faulthandler.enable()
    try:
        from niftidrop.api import convert_file

        limits = pickle.load(requests)
        _limit_memory(limits.get("max_memory"))
        _send(replies, pickle.dumps((READY, os.getpid())))
        settings = None
        while True:
            try:
                args, kwargs = pickle.load(requests)
            except EOFError:
                return 0
            if isinstance(kwargs.get("settings"), str) and kwargs["settings"] == SAME_SETTINGS:
                kwargs["settings"] = settings
            else:
                settings = kwargs.get("settings")
            _reply(replies, _call(convert_file, args, kwargs))
    except BrokenPipeError:  # the parent closed our pipes: nobody to reply to
        return 0
    except BaseException as error:  # reported as a log line, not a bare traceback
        _report_to_parent("conversion_process_failed", level="error", error=_text(error))
        return _CHILD_FAILED


def _call(convert_file: Callable[..., Any], args: Any, kwargs: Any) -> tuple[str, Any]:
    try:
        return (OK, convert_file(*args, **kwargs))
    except (NiftidropError, OSError) as error:
        return (ERROR, error)
    except Exception as error:  # a bug, or MemoryError under `max_memory`: a crash
        _report_to_parent("conversion_exception", level="warning", error=_text(error))
        return (CRASHED, f"{type(error).__name__}: {error}")


def _reply(stream: IO[bytes], reply: tuple[str, Any]) -> None:
    try:
        message = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:  # an exception or result that does not pickle
        value = reply[1] if reply[0] == ERROR else error
        message = pickle.dumps((CRASHED, f"{type(value).__name__}: {value}"))
    _send(stream, message)


def _limit_memory(max_memory: int | None) -> None:
    """Cap this process's private memory at `max_memory` bytes; make it the OOM
    killer's first choice. What cannot be set is reported, not fatal."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(_OOM_SCORE_ADJ)
    if max_memory is None:
        return
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        soft = max_memory if hard == resource.RLIM_INFINITY else min(max_memory, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    except (OSError, ValueError) as error:  # a seccomp filter may forbid it
        _report_to_parent(
            "max_memory_not_applied", level="warning", max_memory=max_memory, error=str(error)
        )


def _report_to_parent(event: str, **fields: Any) -> None:
    """One JSON line on stderr: the parent logs it as its own."""
    line = json.dumps({"event": event, "pid": os.getpid(), **fields}, default=str)
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _text(error: BaseException) -> str:
    """The exception and its traceback, as one string."""
    return "".join(traceback.format_exception(error)).rstrip()


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux), even by kill -9."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        sys.exit(0)


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
