"""Conversions in child processes, `workers` of them, lent to the worker threads in turn.

Why not in the worker threads themselves: a conversion is mostly Python between
short system calls and NumPy or igzip work, and the interpreter lock lets one
thread at a time run Python, handing it over around every system call. Child
processes convert side by side on every CPU (about 1.4x the files per second of
threads on 2 CPUs; see the README). They also contain a failure: a conversion
that crashes the interpreter or is killed for lack of memory ends its child,
not the service, and its input stays claimed and is retried.

The child is `python -m niftidrop.conversion_child <parent pid>`; that module
describes the protocol on its pipes and is the child's side of it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from niftidrop.conversion_child import CRASHED, ERROR, READY, SAME_SETTINGS, receive, send

# Called with the child's pid and what it reported: its JSON object (an
# `event` and fields), or `{"output": text}` for plain text.
OutputHandler = Callable[[int, Mapping[str, Any]], None]


class ConversionCrashed(ChildProcessError):
    """A conversion did not end in a result or a rejection: its process died (a
    signal, the OOM killer, `max_memory`), ran over its time limit, or the
    conversion raised an unexpected exception. The message says which."""


@dataclass(eq=False)
class _Request:
    """A request sent to `child`, its reply not yet read."""

    child: subprocess.Popen[bytes]
    # The child died in an earlier request's conversion: this one never started.
    unstarted: bool = False


class ConversionProcess:
    """One child process running `niftidrop.api.convert_file`, calls pipelined.

    Several threads may call it at once (`niftidrop.workers.SharedProcesses`
    lends it to CALLS_IN_FLIGHT of them): their requests queue in the child's
    pipe in the order sent and convert one at a time in that order, so the child
    starts the next conversion as soon as it has replied, not when its caller
    has had its reply and another caller has sent one. A call waits for its turn
    (every earlier reply read), then for its reply, at most `timeout` seconds.
    A child that dies is started again at the next call; the call it died in
    (or was killed in after `timeout`) raises `ConversionCrashed`, and the calls
    queued behind it, which never started, are sent to the new child (unless
    `kill()` ended it: they raise `ConversionCrashed` too). `max_memory` caps the
    child's private memory (RLIMIT_DATA: its heap and anonymous mappings, not the
    read-only file mappings inputs are read through), so a conversion that needs
    more fails with MemoryError. With `on_output`, what the child reports on
    stderr is handed to it instead of reaching this process's stderr.
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
        self._readers: dict[subprocess.Popen[bytes], threading.Thread] = {}
        self._ready = False
        self._settings_sent: object = None  # held, so its id() is not reused
        # Held while a request is sent or the child is replaced: one order for all.
        self._sending = threading.RLock()
        self._turns = threading.Condition()
        self._requests: collections.deque[_Request] = collections.deque()  # sent order
        self._killed: subprocess.Popen[bytes] | None = None  # by `kill()`: nothing is resent

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
            [sys.executable, "-P", "-m", "niftidrop.conversion_child", str(os.getpid())],
            # Unbuffered: a reply is taken off the pipe only when its turn comes
            # (see `receive`), so polling the pipe says whether it is there.
            bufsize=0,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if self._on_output is None else subprocess.PIPE,
        )
        with self._sending:
            self._child, self._ready, self._settings_sent = child, False, None
        if self._on_output is not None:
            reader = threading.Thread(
                target=_forward_output,
                args=(child.pid, _stream(child.stderr), self._on_output),
                name=f"niftidrop-process-{child.pid}-output",
                daemon=True,
            )
            self._readers[child] = reader
            reader.start()
        limits = pickle.dumps({"max_memory": self.max_memory})
        with contextlib.suppress(OSError):  # a child dead already: `wait_ready` says so
            send(_stream(child.stdin), limits)

    def wait_ready(self) -> None:
        """Wait until the child has imported the converter; ChildProcessError if it died."""
        child = self._running()
        reply = self._receive(child)
        if reply != (READY, child.pid):
            self._end_child(child)
            raise ChildProcessError(f"conversion process: expected {READY!r}, got {reply!r}")
        self._ready = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """`convert_file(*args, **kwargs)` in the child: its result, or its exception."""
        request = self._send_request(args, kwargs)
        while (reply := self._take_turn(request)) is None:
            request = self._send_request(args, kwargs)  # it never started: sent again
        status, value = reply
        if status == ERROR:
            raise value
        if status == CRASHED:
            raise ConversionCrashed(f"conversion raised {value}")
        return value

    def _take_turn(self, request: _Request) -> tuple[str, Any] | None:
        """Wait for the turn of `request`, then for its reply; None if it never started."""
        died = True
        try:
            with self._turns:
                while self._requests[0] is not request:
                    self._turns.wait()
            if request.unstarted:
                if request.child is self._killed:
                    raise ConversionCrashed(f"conversion process {request.child.pid} killed")
                died = False
                return None
            reply: tuple[str, Any] = self._reply(request.child)
            died = False
            return reply
        except BaseException:
            # Whatever its reply was, it must not be read as the next request's.
            self._end_child(request.child)
            raise
        finally:
            self._end_turn(request, died=died)

    def _send_request(self, args: Any, kwargs: Any) -> _Request:
        """Send a request (starting a child first if there is none); it is queued."""
        with self._sending:
            if self._child is None or self._child.poll() is not None:
                self.start()
            if not self._ready:
                self.wait_ready()
            child = self._running()
            settings = kwargs.get("settings")
            if settings is not None and settings is self._settings_sent:
                kwargs = {**kwargs, "settings": SAME_SETTINGS}
            message = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
            try:
                send(_stream(child.stdin), message)
            except OSError:  # a broken pipe: the child is gone
                raise self._ended(child) from None
            self._settings_sent = settings
            request = _Request(child)
            with self._turns:
                self._requests.append(request)
            return request

    def _reply(self, child: subprocess.Popen[bytes]) -> Any:
        """The reply to the request whose turn it is: `(status, value)`. Over its
        time, ConversionCrashed: `_take_turn` then kills the child."""
        if not _readable(_stream(child.stdout), self.timeout):
            raise ConversionCrashed(
                f"conversion process {child.pid} killed after {self.timeout:g} s "
                "(conversion_timeout)"
            )
        return self._receive(child)

    def _end_turn(self, request: _Request, *, died: bool) -> None:
        """The next request's turn; if the child died in this one, the requests
        queued behind it never started."""
        with self._turns:
            self._requests.popleft()
            if died:
                for later in self._requests:
                    later.unstarted = later.unstarted or later.child is request.child
            self._turns.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Let the child finish its calls and exit; kill it after `timeout` seconds."""
        with self._sending:
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
        """Kill the child at once (a forced stop: its conversions are abandoned).

        Safe from any thread: it only sends the signal. The call under way sees
        the child die and raises `ConversionCrashed`, and so do the calls queued
        behind it; the owner (or `close()`) reaps it.
        """
        child = self._killed = self._child
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
            return receive(_stream(child.stdout))
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._ended(child) from None

    def _ended(self, child: subprocess.Popen[bytes]) -> ConversionCrashed:
        """End the child (if it is not yet reaped) and say how it ended."""
        self._end_child(child)
        status = child.wait()
        return ConversionCrashed(f"conversion process {child.pid} ended ({_describe(status)})")

    def _end_child(self, child: subprocess.Popen[bytes]) -> None:
        """Kill and reap `child`; the next call starts another."""
        if child.returncode is None:
            with contextlib.suppress(OSError):
                child.kill()
        child.wait()  # known even if another thread ended it
        with self._sending:  # after the kill: a send blocked on a full pipe ends
            if self._child is child:
                self._child = None
        self._close_streams(child)

    def _close_streams(self, child: subprocess.Popen[bytes]) -> None:
        """Close the pipes of a reaped child, once its last output was handed on."""
        reader = self._readers.pop(child, None)
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
