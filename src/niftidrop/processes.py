"""Conversions in child processes: each worker thread has one of its own.

Why not in the worker threads themselves: a conversion is mostly Python between
short system calls and NumPy or igzip work, and the interpreter lock lets one
thread at a time run Python, handing it over around every system call. Child
processes convert side by side on every CPU (about 1.4x the files per second of
threads on 2 CPUs; see the README). They also contain a failure: a conversion
that crashes the interpreter or is killed for lack of memory ends its child,
not the service, and its input stays claimed and is retried.

The child is `python -m niftidrop.processes <parent pid>`. Its stdin carries
pickled requests (positional and keyword arguments of `convert_file`), its
stdout pickled replies (`("ok", result)` or `("error", exception)`); it starts
with `("ready", pid)`. Anything else it prints goes to stderr. It ignores
SIGINT and SIGTERM (the service decides when a conversion may be cut short),
exits when its stdin closes, and is killed by the kernel when its parent dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pickle
import signal
import subprocess
import sys
from typing import IO, Any, Final

from niftidrop.errors import NiftidropError

READY: Final = "ready"
OK: Final = "ok"
ERROR: Final = "error"
_PR_SET_PDEATHSIG: Final = 1


class ConversionProcess:
    """One child process running `niftidrop.api.convert_file`, one call at a time.

    Not thread-safe: it belongs to one worker thread. A child that dies is
    started again at the next call; the call it died in raises ChildProcessError
    (an OSError: for the service, an environmental error to retry).
    """

    def __init__(self) -> None:
        self._child: subprocess.Popen[bytes] | None = None
        self._ready = False

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
        self._child = subprocess.Popen(
            [sys.executable, "-P", "-m", "niftidrop.processes", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._ready = False

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
        request = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            _send(_stream(child.stdin), request)
        except OSError:  # a broken pipe: the child is gone
            raise self._ended(child) from None
        status, value = self._receive(child)
        if status == ERROR:
            raise value
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
        with contextlib.suppress(OSError):
            _stream(child.stdout).close()

    def kill(self) -> None:
        """End the child at once (a forced stop: its conversion is abandoned)."""
        self._end_child()

    def _running(self) -> subprocess.Popen[bytes]:
        if self._child is None:
            raise ChildProcessError("conversion process: not started")
        return self._child

    def _receive(self, child: subprocess.Popen[bytes]) -> Any:
        """The child's next reply; ChildProcessError (and the child ended) if it died."""
        try:
            return pickle.load(_stream(child.stdout))
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._ended(child) from None

    def _ended(self, child: subprocess.Popen[bytes]) -> ChildProcessError:
        """End the child (if it is not yet reaped) and say how it ended."""
        self._end_child()
        status = child.wait()  # known even if another thread ended it
        return ChildProcessError(f"conversion process {child.pid} ended ({_describe(status)})")

    def _end_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        with contextlib.suppress(OSError):
            child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            with contextlib.suppress(OSError):
                _stream(stream).close()


def _send(stream: IO[bytes], message: bytes) -> None:
    stream.write(message)
    stream.flush()


def _stream(stream: IO[bytes] | None) -> IO[bytes]:
    if stream is None:  # pragma: no cover - both pipes are always requested
        raise ChildProcessError("conversion process: no pipe")
    return stream


def _describe(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
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

    from niftidrop.api import convert_file

    _send(replies, pickle.dumps((READY, os.getpid())))
    while True:
        try:
            args, kwargs = pickle.load(requests)
        except EOFError:
            return 0
        try:
            reply: tuple[str, Any] = (OK, convert_file(*args, **kwargs))
        except (NiftidropError, OSError) as error:
            reply = (ERROR, error)
        except Exception as error:  # a bug: reported to the worker, which logs it
            reply = (ERROR, _plain(error))
        _reply(replies, reply)


def _reply(stream: IO[bytes], reply: tuple[str, Any]) -> None:
    try:
        message = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:  # an exception that does not pickle
        message = pickle.dumps((ERROR, _plain(reply[1] if reply[0] == ERROR else error)))
    _send(stream, message)


def _plain(error: BaseException) -> RuntimeError:
    return RuntimeError(f"{type(error).__name__}: {error}")


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux), even by kill -9."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        sys.exit(0)


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
