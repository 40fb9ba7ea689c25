"""The conversion child process: `python -m niftidrop.conversion_child <parent pid>`.

`niftidrop.processes.ConversionProcess` starts it and is the other end of its
pipes. Each message is pickled, its length before it. Its stdin carries first
its limits (`{"max_memory": bytes}`), then requests (positional and keyword
arguments of `convert_file`; a `settings` that is the object the last request
carried is sent as SAME_SETTINGS, which saves pickling it both ways for every
input); its stdout replies (`("ok", result)`, `("error", exception)` for a
rejection or an environmental error, or `("crashed", text)` for any other
exception), one per request in the order of the requests; it starts with
`("ready", pid)`. What it reports on its own (a traceback, a limit it could not
set) are JSON lines on its stderr, which the parent hands to `on_output`;
anything else a library prints goes there too. It ignores SIGINT and SIGTERM
(the service decides when a conversion may be cut short), exits when its stdin
closes, and is killed by the kernel when its parent dies.
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
import signal
import struct
import sys
import traceback
from collections.abc import Callable
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
# Before each message: its length in bytes.
_LENGTH: Final = struct.Struct("<Q")


def send(stream: IO[bytes], message: bytes) -> None:
    """Write one message (pickled bytes) to a pipe of the protocol, at once: its
    length first, so that the reader takes exactly this message off the pipe."""
    data = memoryview(_LENGTH.pack(len(message)) + message)
    while data:  # an unbuffered pipe may take part of it (a signal in the write)
        data = data[stream.write(data) :]
    stream.flush()


def receive(stream: IO[bytes]) -> Any:
    """The next message on `stream`, unpickled; EOFError if the pipe ends first.

    It reads exactly that message's bytes and nothing after them. The service
    reads replies from an unbuffered pipe and polls it to know whether the next
    reply is there: a buffer could have taken that reply in with this one, where
    the poll does not see it.
    """
    (length,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))
    return pickle.loads(_read_exactly(stream, length))


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError(f"the pipe ended {len(data)} bytes into a message of {size}")
        data += chunk
    return bytes(data)


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

        limits = receive(requests)
        _limit_memory(limits.get("max_memory"))
        send(replies, pickle.dumps((READY, os.getpid())))
        settings = None
        while True:
            try:
                args, kwargs = receive(requests)
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
    send(stream, message)


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
