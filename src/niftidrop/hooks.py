"""Delivering the hand-off's events (README: Hand-off): hook commands and `notify_url`.

`on_converted` / `on_failed` are run directly (an argv list, never a shell) in a
process group of their own, with the event as one JSON object on stdin and its
key paths in `NIFTIDROP_*` variables; the whole group is killed after
`hook_timeout`. `notify_url` gets the same JSON POSTed as `application/json`.
The standard library's urllib is enough for one POST with a timeout; the retries
are ours, not an HTTP client's.

`Deliveries` runs them on a few threads of its own (`DELIVERY_THREADS`), beside
the workers, so that a slow hook never slows the spool; those threads, and the
hooks they start, run at nice `HOOK_NICENESS`, so that conversions keep the CPUs
first (starting a process costs about as much CPU as converting a small input).
Each target of an event gets `hook_attempts` tries, with a pause that doubles
from `FIRST_RETRY_SECONDS` up to `MAX_RETRY_SECONDS`; each failed try is logged
(`hook_failed`, `notify_failed`), and after the last the event is dropped for
that target (`event_dropped`, an error, with the whole event as `payload`). A
delivered or dropped event leaves the state folder. At a stop, deliveries in
flight get until the stop's deadline (`shutdown_timeout`); what is left stays
pending for the next start.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from http.client import HTTPException
from typing import TYPE_CHECKING, Any, Final

from niftidrop.config_sources import HOOK_VARIABLES
from niftidrop.events import HOOK, NOTIFY, EventStore, Pending
from niftidrop.logs import get_logger
from niftidrop.version import __version__

if TYPE_CHECKING:
    from niftidrop.settings import Settings

DELIVERY_THREADS: Final = 4
# The nice value of the delivery threads, and so of the hooks they start.
HOOK_NICENESS: Final = 10
FIRST_RETRY_SECONDS: Final = 1.0
MAX_RETRY_SECONDS: Final = 60.0
# How much of a failing hook's stderr its `hook_failed` line quotes (the end of it).
STDERR_SHOWN: Final = 400
# At a stop: how long a delivery whose hook was killed has to notice.
KILLED_DELIVERY_SECONDS: Final = 5.0

log = get_logger()


class DeliveryFailed(Exception):
    """A try that did not deliver: its reason, in words."""


class _Interrupted(Exception):
    """The stop killed the hook: not a failed try, the event stays pending."""


def hook_environment(event: Mapping[str, Any], base: Mapping[str, str]) -> dict[str, str]:
    """`base` with the event's key paths as `NIFTIDROP_*` variables (those it has)."""
    ours = set(HOOK_VARIABLES.values())  # never an older event's, inherited
    environment = {name: value for name, value in base.items() if name not in ours}
    for key, name in HOOK_VARIABLES.items():
        value = event.get(key)
        if isinstance(value, list):  # outputs: the first (all of them are in the JSON)
            value = value[0] if value else None
        if value is not None:
            environment[name] = str(value)
    return environment


def backoff(tries: int) -> float:
    """The pause after `tries` failed tries in a row."""
    return float(min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** max(0, tries - 1)))


class HookRunner:
    """Runs hook commands and can kill those still running (at a stop)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._killed = False

    def run(self, command: Sequence[str], event: Mapping[str, Any]) -> None:
        """Run `command` with `event` on stdin; DeliveryFailed unless it exits 0 in time."""
        payload = json.dumps(event).encode()
        try:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,  # stdout is the service's log
                stderr=subprocess.PIPE,
                env=hook_environment(event, os.environ),
                start_new_session=True,  # its own process group, killed as one
            )
        except OSError as error:
            raise DeliveryFailed(f"cannot start {command[0]!r}: {error.strerror}") from None
        with self._lock:
            self._running.add(process)
        try:
            stderr = self._wait(process, payload)
        finally:
            with self._lock:
                self._running.discard(process)
                killed = self._killed
        if killed and process.returncode == -signal.SIGKILL:
            raise _Interrupted
        if process.returncode != 0:
            raise DeliveryFailed(_exit_reason(process.returncode, stderr))

    def _wait(self, process: subprocess.Popen[bytes], payload: bytes) -> bytes:
        """Feed stdin, read stderr until the hook ends; kill its group at the timeout.

        What it started in the background and left holding stderr past the
        timeout is killed with it; the hook's own exit status still decides.
        """
        try:
            return process.communicate(payload, timeout=self.timeout)[1] or b""
        except subprocess.TimeoutExpired:
            exited = process.poll() is not None
            _kill_group(process)
            process.wait()
            for stream in (process.stdin, process.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            if exited:
                return b""
            raise DeliveryFailed(
                f"ran over hook_timeout ({self.timeout:g} s): its process group was killed"
            ) from None

    def kill_all(self) -> None:
        """Kill every hook still running, and each one's process group (at a stop)."""
        with self._lock:
            self._killed = True
            running = list(self._running)
        for process in running:
            _kill_group(process)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _exit_reason(code: int, stderr: bytes) -> str:
    if code < 0:
        try:
            reason = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            reason = f"killed by signal {-code}"
    else:
        reason = f"exited with status {code}"
    said = stderr.decode(errors="replace").strip()
    if said:
        reason += ": " + (said if len(said) <= STDERR_SHOWN else "…" + said[-STDERR_SHOWN:])
    return reason


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a place to send the event to (notify_url names it)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER: Final = urllib.request.build_opener(_NoRedirect)


def post_event(url: str, event: Mapping[str, Any], timeout: float) -> None:
    """POST `event` to `url` as JSON; DeliveryFailed unless the answer is 2xx."""
    request = urllib.request.Request(
        url,
        data=json.dumps(event).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": f"niftidrop/{__version__}"},
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise DeliveryFailed(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DeliveryFailed(str(error.reason)) from None
    except (OSError, HTTPException) as error:
        raise DeliveryFailed(str(error) or type(error).__name__) from None


class Deliveries:
    """The delivery threads of one service and the events waiting for them, by due time.

    Without a store (no hook, no notify_url) it does nothing.
    """

    def __init__(self, settings: Settings, store: EventStore | None) -> None:
        self.settings = settings
        self.store = store
        self.hooks = HookRunner(settings.hook_timeout)
        self._commands = {"converted": settings.on_converted, "failed": settings.on_failed}
        self._ready = threading.Condition()
        self._queue: list[tuple[float, int, Pending]] = []  # heap of (due, order, event)
        self._order = itertools.count()
        self._busy = 0  # events being delivered
        self._cut = 0  # events whose delivery the stop cut short (still pending)
        self._stopping = False
        self._stopped = False  # set once the service has stopped: nothing more is said
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"Deliveries({self.store!r})"

    def start(self) -> None:
        """Queue the events a previous run left, and start the delivery threads."""
        if self.store is None:
            return
        self.store.listener = self.submit
        for pending in self.store.load():
            self.submit(pending)
        for number in range(DELIVERY_THREADS):
            thread = threading.Thread(
                target=self._work, name=f"niftidrop-delivery-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def submit(self, pending: Pending, delay: float = 0.0) -> None:
        """Deliver `pending` after `delay` seconds."""
        with self._ready:
            heapq.heappush(self._queue, (time.monotonic() + delay, next(self._order), pending))
            self._ready.notify()

    def idle(self) -> bool:
        """No event waits or is being delivered (`run --once` waits for this)."""
        with self._ready:
            return not self._queue and not self._busy

    def stop(self, deadline: float, *, force: Callable[[], bool]) -> None:
        """Take no new event; let deliveries in flight finish until `deadline` (monotonic)
        unless `force()`, then kill the hooks still running. The rest stays pending."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        for thread in self._threads:
            while thread.is_alive() and not force() and time.monotonic() < deadline:
                thread.join(timeout=0.1)
        self.hooks.kill_all()
        for thread in self._threads:
            thread.join(timeout=KILLED_DELIVERY_SECONDS)
        with self._ready:
            left = len(self._queue) + self._busy + self._cut
            self._stopped = True
        if left:
            log.warning("events_left_pending", events=left, reason="delivered after the next start")

    # On the delivery threads.

    def _work(self) -> None:
        # Conversions first: this thread and the hooks it starts (which inherit its
        # nice value) take the CPUs the conversions leave.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HOOK_NICENESS)
        while True:
            pending = self._take()
            if pending is None:
                return
            try:
                self._deliver(pending)
            except Exception:  # a bug must not end the thread; the event stays pending
                self._say("exception", "delivery_crashed", input=pending.input, id=pending.id)
            finally:
                with self._ready:
                    self._busy -= 1

    def _take(self) -> Pending | None:
        """The next event that is due, waiting for one; None once the stop came."""
        with self._ready:
            while not self._stopping:
                wait = None
                if self._queue:
                    wait = self._queue[0][0] - time.monotonic()
                    if wait <= 0:
                        self._busy += 1
                        return heapq.heappop(self._queue)[2]
                self._ready.wait(wait)
            return None

    def _deliver(self, pending: Pending) -> None:
        """One try of each target still waiting for `pending`."""
        assert self.store is not None
        kind = str(pending.event.get("event"))
        attempts = self.settings.hook_attempts
        failures: list[tuple[str, int, str]] = []
        for target in list(pending.tries):
            if target not in self.store.targets(kind):
                del pending.tries[target]  # no longer configured
                continue
            attempt = pending.tries[target] + 1
            started = time.perf_counter()
            try:
                self._try(target, kind, pending)
            except _Interrupted:
                with self._ready:
                    self._cut += 1
                return  # the stop killed it: pending, as it was
            except DeliveryFailed as failed:
                pending.tries[target] = attempt
                failures.append((target, attempt, str(failed)))
                continue
            del pending.tries[target]
            seconds = round(time.perf_counter() - started, 6)
            self._tell("info", "event_delivered", pending, target, attempt=attempt, seconds=seconds)
        for target, attempt, _ in failures:
            if attempt >= attempts:
                del pending.tries[target]
        delay = backoff(max(pending.tries.values(), default=0))
        for target, attempt, reason in failures:
            logged = "hook_failed" if target == HOOK else "notify_failed"
            retry_in = delay if attempt < attempts else None
            self._tell(
                "warning",
                logged,
                pending,
                target,
                attempt=attempt,
                attempts=attempts,
                reason=reason,
                retry_in=retry_in,
            )
            if attempt >= attempts:
                # The whole event, so that it can be replayed (`event` is the line's name).
                self._tell("error", "event_dropped", pending, target, payload=pending.event)
        self._settle(pending, delay)

    def _try(self, target: str, kind: str, pending: Pending) -> None:
        if target == NOTIFY:
            assert self.settings.notify_url is not None
            post_event(self.settings.notify_url, pending.event, self.settings.hook_timeout)
            return
        command = self._commands.get(kind)
        assert command is not None
        self.hooks.run(command, pending.event)

    def _settle(self, pending: Pending, delay: float) -> None:
        """After a try: the event leaves the state folder, or waits for its next try."""
        assert self.store is not None
        with self._ready:
            if self._stopped:
                return  # nothing is written after the stop: it is tried again at the next start
        try:
            if pending.tries:
                self.store.save(pending)
            else:
                self.store.remove(pending)
        except OSError as error:
            self._say(
                "warning", "event_not_saved", input=pending.input, id=pending.id, error=str(error)
            )
        if pending.tries:
            self.submit(pending, delay)

    def _tell(self, level: str, name: str, pending: Pending, target: str, **fields: Any) -> None:
        """Log what became of one target's try of `pending`."""
        kind = pending.event.get("event")
        self._say(
            level,
            name,
            input=pending.input,
            id=pending.id,
            target="notify_url" if target == NOTIFY else f"on_{kind}",
            **fields,
        )

    def _say(self, level: str, name: str, **fields: Any) -> None:
        """Log, unless the service has stopped (nothing about an input after that)."""
        with self._ready:
            if self._stopped:
                return
        getattr(log, level)(name, **fields)
