"""The service (README: File protocol, Logs): `startup()` → `main_loop()` → `shutdown()`.

The main thread owns every decision: it reads sightings from the inbox watcher,
asks the readiness tracker which files may be read, rescans, retries, writes the
heartbeat and talks to systemd. Worker threads only take jobs (an inbox path to
claim, or a claim to finish) from one priority queue ordered by modification
time, so a backlog goes oldest first. Each worker converts in a child process of
its own (`niftidrop.processes`): the interpreter lock would let threads run only
one conversion's Python at a time. Signal handlers only set flags.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import os
import queue
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, Protocol

from niftidrop import __version__
from niftidrop.errors import ConversionError, ErrorCode, ServiceError
from niftidrop.logs import get_logger
from niftidrop.processes import ConversionCrashed, ConversionProcess
from niftidrop.spool import COMMIT_RECORD, LOCK, Claim, Converted, Converter, Failed, Spool
from niftidrop.systemd import SystemdNotifier
from niftidrop.watcher import (
    InboxWatcher,
    ReadinessTracker,
    Seen,
    Sighting,
    choose_observer,
    scan_inbox,
)

if TYPE_CHECKING:
    import numpy as np

    from niftidrop.library import Match
    from niftidrop.metrics import Metrics
    from niftidrop.settings import Settings

MAX_RETRY_SECONDS: Final = 60.0
FIRST_RETRY_SECONDS: Final = 0.5
# The longest the main loop blocks: how soon it notices a signal's flag.
LOOP_TICK_SECONDS: Final = 0.25
# At a stop: how long a worker whose conversion process was killed has to notice.
KILLED_JOB_SECONDS: Final = 5.0

log = get_logger()


class Library(Protocol):
    """What the service needs of the reference library."""

    def build(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def resolve(self, name: str) -> Match: ...
    def __len__(self) -> int: ...


class ConvertFile(Protocol):
    """`niftidrop.api.convert_file`."""

    def __call__(
        self,
        source: Path,
        out_dir: Path,
        *,
        settings: Settings,
        reference: Path | None,
        stem: str | None = None,
        affine: np.ndarray[Any, Any] | None = None,
        provenance: Mapping[str, object] | None = None,
        owner: str = "",
        journal: Path | None = None,
    ) -> Any: ...


@contextlib.contextmanager
def handle_signals(service: Service) -> Iterator[None]:
    """SIGTERM/SIGINT stop the service (a second SIGINT at once), SIGHUP rescans.

    The handlers only set flags; the previous handlers are restored on exit.
    Outside the main thread (a service in a test's thread) nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            service.request_rescan()
        else:
            service.request_stop(force=signum == signal.SIGINT and service.stop_requested)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, on_signal) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass(frozen=True)
class _Truncated:
    """An inbox file still incomplete after `incomplete_timeout`."""

    path: Path


Job = Path | Claim | _Truncated | None  # None: a worker's stop signal


class _Cancelled(Exception):
    """The stop came while a job waited (for its reference): its input stays claimed."""


@dataclass
class Tally:
    """What the service did, for `run --once`'s exit code and the heartbeat."""

    converted: int = 0
    failed: int = 0
    deferred: int = 0  # left claimed after an environmental error (`--once`)
    incomplete: int = 0  # left in the inbox, never complete (`--once`)


class Service:
    """The long-running converter of one spool (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        library: Library | None = None,
        convert_file: ConvertFile | None = None,
        metrics: Metrics | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        if library is None:
            from niftidrop.library import ReferenceLibrary

            library = ReferenceLibrary.from_settings(settings)
        if metrics is None:
            from niftidrop.metrics import Metrics

            metrics = Metrics()
        settings = settings.for_service()
        self.settings = settings
        self.spool = Spool(settings)
        self.library = library
        self.metrics = metrics
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self.tally = Tally()
        self.ready = threading.Event()  # set once the service is fully up
        self.stop_requested = False  # set by signal handlers: plain flags only
        self._force_stop = False
        self._rescan_requested = False
        # None: `niftidrop.api.convert_file` in a child process per worker; a
        # converter given here (tests) runs in the worker threads themselves.
        self._convert_file = convert_file
        self._processes: list[ConversionProcess] = []
        self._tracker = ReadinessTracker(
            settle_seconds=settings.settle_seconds,
            incomplete_timeout=settings.incomplete_timeout,
        )
        self._sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        self._watcher: InboxWatcher | None = None
        self._jobs: queue.PriorityQueue[tuple[int, int, Job]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._queued: set[Path] = set()  # inbox paths waiting in `_jobs`
        self._unreachable_seen: set[Path] = set()  # inbox paths too long to use, logged
        self._retries: list[tuple[float, int, Claim]] = []  # heap of (due, order, claim)
        self._attempts: dict[Path, int] = {}  # claim folder → environmental errors in a row
        # Claim folder → crashed conversions (guarantee 13) and what ended the last.
        self._crashes: dict[Path, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._outstanding = 0  # jobs queued or running
        self._workers: list[threading.Thread] = []
        self._stopping = threading.Event()  # workers take no new job
        # Set just before `service_stopped`: nothing about an input is logged after it.
        self._stopped = threading.Event()
        self._spool_identity: dict[str, tuple[int, int]] = {}  # see `_check_spool`
        self._once = False
        self._last_tick = time.monotonic()
        self._progress: Any = None

    def __repr__(self) -> str:
        return f"Service({self.spool!r}, workers={self.settings.workers})"

    # Control (thread- and signal-safe: flags only).

    def request_stop(self, *, force: bool = False) -> None:
        """Stop claiming and finish in-flight work; `force`: do not wait for it."""
        self._force_stop = self._force_stop or force
        self.stop_requested = True

    def request_rescan(self) -> None:
        """Re-index the library and rescan the inbox at the next tick."""
        self._rescan_requested = True

    def healthy(self) -> bool:
        """The main loop is turning (for `/healthz`)."""
        return time.monotonic() - self._last_tick < 3 * self.settings.heartbeat_interval

    # Life cycle.

    def run(self, *, once: bool = False) -> int:
        """Start, serve until stopped (or, with `once`, until the inbox is done), stop.

        Returns 0, or 1 when `once` left some input unconverted.
        """
        self._once = once
        with handle_signals(self):
            try:
                self.startup()
            except BaseException as error:
                self._release()
                _log_failure(error)
                raise
            try:
                self.main_loop()
            except BaseException as error:
                _log_failure(error)
                raise
            finally:
                self.shutdown()
        tally = self.tally
        if once and (tally.failed or tally.deferred or tally.incomplete):
            return 1
        return 0

    def startup(self) -> None:
        settings = self.settings
        settings.check_folders()  # before any folder is created inside another
        self.spool.create_folders()
        self._create_library_folders()
        self.spool.lock()
        self._spool_identity = self._spool_identities()
        self._start_processes()  # they import while the library is indexed
        observer = None if self._once else choose_observer(settings.observer, self.spool.inbox)
        log.info(
            "service_started",
            version=__version__,
            pid=os.getpid(),
            mode="once" if self._once else "service",
            inbox=str(self.spool.inbox),
            outbox=str(self.spool.outbox),
            archive=str(self.spool.archive_folder),
            failed=str(self.spool.failed_folder),
            library=[str(folder) for folder in settings.library_dirs],
            workers=settings.workers,
            observer=observer,
        )
        if self._once:
            self.library.build()
        else:
            self.library.start()  # watch first, then walk: nothing added meanwhile is missed
        self._library_indexed()
        removed = self.spool.remove_stale_temporaries()
        claims = self.spool.claims()
        if removed or claims:
            log.info("spool_recovered", claims=len(claims), temporary_files_removed=removed)
        for claim in claims:
            self._submit(claim, _mtime_ns(claim.path))
        if observer is not None:
            self._watcher = InboxWatcher(
                self.spool.inbox,
                self._sightings,
                recursive=settings.recursive,
                observer=observer,
                poll_interval=settings.poll_interval,
            )
            self._watcher.start()
        self._rescan_inbox()
        self._start_workers()
        if settings.metrics_address and not self._once:
            self.metrics.serve(settings.metrics_address, self.healthy)
        self.notifier.notify("READY=1")
        self.notifier.notify(f"STATUS=watching {self.spool.inbox}")
        self._write_heartbeat()
        self.ready.set()
        log.info("service_ready", inbox=str(self.spool.inbox), backlog=len(self._tracker))
        if self._once and sys.stderr.isatty():
            from tqdm import tqdm

            self._progress = tqdm(
                total=self._outstanding + len(self._tracker), unit="file", file=sys.stderr
            )

    def _create_library_folders(self) -> None:
        """Create missing library folders, so a fresh set-up has a place for references
        and the library watch starts on a real folder. A read-only library that is
        missing is reported, not fatal: references may be mounted there later."""
        for folder in self.settings.library_dirs:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                log.warning("library_unavailable", folder=str(folder), error=str(error))

    def _library_indexed(self) -> None:
        size = len(self.library)
        self.metrics.set_library_size(size)
        log.info("library_indexed", references=size)
        if size == 0:
            log.warning(
                "library_empty",
                library=[str(folder) for folder in self.settings.library_dirs],
                message="no reference NIfTI files: inputs will fail as no_reference",
            )

    def main_loop(self) -> None:
        settings = self.settings
        now = time.monotonic()
        next_rescan = now + settings.rescan_interval
        next_heartbeat = now + settings.heartbeat_interval
        interval = self.notifier.watchdog_interval
        next_ping = now if interval else float("inf")
        check_period = min(max(settings.settle_seconds / 4, 0.05), 0.5)
        once_deadline = now + settings.settle_seconds + 2 * check_period
        next_check = now
        while not self.stop_requested:
            now = time.monotonic()
            self._last_tick = now
            deadlines = [next_heartbeat, next_ping, now + LOOP_TICK_SECONDS]
            if not self._once:
                deadlines.append(next_rescan)
            if len(self._tracker):
                deadlines.append(next_check)
            with self._lock:
                if self._retries:
                    deadlines.append(self._retries[0][0])
            finished = self._take_sightings(timeout=max(0.0, min(deadlines) - now))
            now = time.monotonic()
            if finished:
                self._decide(finished)  # a closed or moved-in file: no need to wait
            if now >= next_check and len(self._tracker):
                self._decide()
                next_check = now + check_period
            self._resubmit_due_retries(now)
            if self._rescan_requested or (not self._once and now >= next_rescan):
                if self._rescan_requested:
                    self._rescan_requested = False
                    self.library.build()
                    self._library_indexed()
                self._rescan_inbox()
                next_rescan = now + settings.rescan_interval
            if now >= next_heartbeat:
                self._check_spool()  # raises ServiceError when it cannot go on
                self._write_heartbeat()
                next_heartbeat = now + settings.heartbeat_interval
            if interval and now >= next_ping:
                self.notifier.notify("WATCHDOG=1")
                next_ping = now + interval
            with self._lock:
                outstanding = self._outstanding
            self.metrics.set_queue_depth(outstanding)
            if self._once and self._once_done(outstanding, now >= once_deadline):
                return

    def _once_done(self, outstanding: int, patience_over: bool) -> bool:
        """`run --once` ends when every job is done and nothing is still settling."""
        if outstanding or self._retries:
            return False
        if len(self._tracker) and not patience_over:
            return False
        for path in self._tracker.paths():
            self.tally.incomplete += 1
            log.warning("input_incomplete", input=str(self.spool.relative(path)))
        return True

    def shutdown(self) -> None:
        log.info("service_stopping", force=self._force_stop)
        self.notifier.notify("STOPPING=1")
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        # Wakes the jobs waiting for a late reference: they give up, inputs left claimed.
        self.library.stop()
        for _ in self._workers:
            self._jobs.put((-1, next(self._order), None))
        deadline = time.monotonic() + self.settings.shutdown_timeout
        for worker in self._workers:
            while worker.is_alive() and not self._force_stop and time.monotonic() < deadline:
                worker.join(timeout=0.1)
        left = sum(worker.is_alive() for worker in self._workers)
        self._stop_processes()
        if left:
            log.warning("inputs_left_claimed", inputs=left, reason="stopped before they finished")
        if self._progress is not None:
            self._progress.close()
        self._write_heartbeat(state="stopped")
        self._release()
        self._stopped.set()
        log.info(
            "service_stopped",
            converted=self.tally.converted,
            failed=self.tally.failed,
            deferred=self.tally.deferred,
            incomplete=self.tally.incomplete,
        )

    def _release(self) -> None:
        """Stop the helpers startup began (each tolerates never having started)."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self.library.stop()
        self.metrics.close()
        for number, process in enumerate(self._processes):  # closed after a normal stop
            process.kill()
            if not self._worker_busy(number):
                process.close()
        self.spool.remove_spare_folders()
        self.spool.unlock()
        self.notifier.close()

    # Main-thread helpers.

    def _take_sightings(self, timeout: float) -> list[Path]:
        """Note what the watcher saw; returns the files seen finished."""
        try:
            batch = [self._sightings.get(timeout=timeout)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while True:
                batch.append(self._sightings.get_nowait())
        finished = []
        for path, seen in batch:
            if seen is Seen.FOLDER:
                found_in = scan_inbox(
                    path, recursive=self.settings.recursive, unreachable=self._unreachable
                )
                for found in found_in:
                    self._note(found, finished=False)
            elif self._note(path, finished=seen is Seen.FINISHED) and seen is Seen.FINISHED:
                finished.append(path)
        return finished

    def _note(self, path: Path, *, finished: bool) -> bool:
        with self._lock:
            if path in self._queued:
                return False
        self._tracker.note(path, finished=finished)
        return True

    def _decide(self, paths: list[Path] | None = None) -> None:
        verdicts = self._tracker.poll(paths)
        for path, mtime_ns in verdicts.ready:
            self._submit(path, mtime_ns)
        for path in verdicts.truncated:
            self._submit(_Truncated(path), 0)
        for path, reason in verdicts.ignored:  # left where it is; reported once
            log.warning("input_ignored", input=str(self.spool.relative(path)), reason=reason)

    def _rescan_inbox(self) -> None:
        found = scan_inbox(
            self.spool.inbox, recursive=self.settings.recursive, unreachable=self._unreachable
        )
        for path in found:
            if path not in self._tracker:
                self._note(path, finished=False)
        self._decide()

    def _unreachable(self, path: Path) -> None:
        """A file or folder whose path is too long to be used: logged once, left alone."""
        if path in self._unreachable_seen:
            return
        self._unreachable_seen.add(path)
        log.warning(
            "input_ignored",
            input=str(self.spool.relative(path)),
            reason=f"its path is longer than the system allows ({len(os.fsencode(path))} "
            "bytes): it cannot be opened by name, so it is left where it is",
        )

    def _resubmit_due_retries(self, now: float) -> None:
        due = []
        with self._lock:  # workers push onto the heap
            while self._retries and self._retries[0][0] <= now:
                due.append(heapq.heappop(self._retries)[2])
        for claim in due:
            self._submit(claim, 0)

    def _write_heartbeat(self, state: str = "running") -> None:
        """The heartbeat file; `state` "stopped" tells `health` the service is gone."""
        with self._lock:
            outstanding = self._outstanding
        try:
            self.spool.write_heartbeat(
                {
                    "pid": os.getpid(),
                    "state": state,
                    "queued": outstanding,
                    "waiting": len(self._tracker),
                    "converted": self.tally.converted,
                    "failed": self.tally.failed,
                }
            )
        except OSError as error:
            log.warning("heartbeat_failed", error=str(error))

    def _spool_identities(self) -> dict[str, tuple[int, int]]:
        """(device, inode) of the inbox (symlinks followed, and whether it is one) and
        of the lock file, as taken at start."""
        found = {}
        inbox, lock = self.spool.inbox, self.spool.state / LOCK
        with contextlib.suppress(OSError):
            found["inbox_is_link"] = (int(inbox.is_symlink()), 0)
            found["inbox"] = _identity(inbox.stat())
            found["lock"] = _identity(lock.stat())
        return found

    def _check_spool(self) -> None:
        """Put back what was removed under the running service, or stop it.

        A removed state folder, claims folder or lock file is made again (the lock
        taken again). An inbox that is gone, or replaced (renamed away and made
        anew, or made a symlink), cannot be watched or claimed from safely any more:
        ServiceError, so the service exits non-zero and its supervisor restarts it.
        """
        inbox = self.spool.inbox
        try:
            is_link = (int(inbox.is_symlink()), 0)
            info = inbox.stat()
        except OSError as error:
            raise ServiceError(f"inbox: {inbox} is gone ({error.strerror})") from None
        expected = self._spool_identity
        if (
            not stat.S_ISDIR(info.st_mode)
            or is_link != expected.get("inbox_is_link", is_link)
            or _identity(info) != expected.get("inbox", _identity(info))
        ):
            raise ServiceError(
                f"inbox: expected the folder {inbox} watched since the start, found it "
                "replaced (moved away, made anew or made a symbolic link)"
            )
        remade = []
        try:
            if not self.spool.claims_folder.is_dir():
                self.spool.claims_folder.mkdir(parents=True, exist_ok=True)
                self.spool.remove_spare_folders()  # they were in the removed folder
                remade.append(str(self.spool.claims_folder))
            lock = self.spool.state / LOCK
            lock_info = lock.stat() if lock.exists() else None
            if lock_info is None or _identity(lock_info) != expected.get("lock"):
                self.spool.unlock()
                self.spool.lock()  # ConfigError if another service took the folder
                self._spool_identity = self._spool_identities()
                remade.append(str(lock))
        except (OSError, ValueError) as error:
            state = self.spool.state
            raise ServiceError(f"state_dir: cannot make {state} again: {error}") from None
        if remade:
            log.warning("state_recreated", state=str(self.spool.state), made=remade)

    # Jobs.

    def _submit(self, job: Path | Claim | _Truncated, mtime_ns: int) -> None:
        with self._lock:
            if isinstance(job, Path):
                if job in self._queued:
                    return
                self._queued.add(job)
            self._outstanding += 1
        self._jobs.put((mtime_ns, next(self._order), job))

    def _start_processes(self) -> None:
        if self._convert_file is not None:
            return
        # Replies carry a ConversionResult: its module (numpy, nibabel) is imported
        # now rather than when the first conversion is done.
        import niftidrop.api  # noqa: F401

        self._processes = [
            ConversionProcess(
                max_memory=self.settings.max_memory,
                timeout=self.settings.conversion_timeout,
                on_output=self._process_output,
            )
            for _ in range(self.settings.workers)
        ]
        for process in self._processes:
            process.start()

    def _start_workers(self) -> None:
        converters: list[ConvertFile] = []
        if self._convert_file is not None:
            converters = [self._convert_file] * self.settings.workers
        for process in self._processes:
            try:
                process.wait_ready()
            except ChildProcessError as error:
                raise ServiceError(f"a conversion process did not start: {error}") from None
            converters.append(process)
        for number, convert_file in enumerate(converters):
            worker = threading.Thread(
                target=self._work,
                args=(convert_file,),
                name=f"niftidrop-worker-{number}",
                daemon=True,
            )
            worker.start()
            self._workers.append(worker)

    def _process_output(self, pid: int, report: Mapping[str, Any]) -> None:
        """Log what a conversion process reported (on its own thread, see processes)."""
        if self._stopped.is_set():
            return
        fields = dict(report)
        event = str(fields.pop("event", "conversion_process_output"))
        level = str(fields.pop("level", "warning"))
        fields["pid"] = pid
        if level not in ("debug", "info", "warning", "error"):
            level = "warning"
        getattr(log, level)(event, **fields)

    def _worker_busy(self, number: int) -> bool:
        return number < len(self._workers) and self._workers[number].is_alive()

    def _stop_processes(self) -> None:
        """Close the conversion processes of idle workers; kill those still converting.

        A killed conversion ends its job at once (its input stays claimed); the
        worker is given a moment to notice, so that nothing about the input is
        logged after `service_stopped`.
        """
        for number, process in enumerate(self._processes):
            if self._worker_busy(number) or self._force_stop:
                process.kill()
        deadline = time.monotonic() + KILLED_JOB_SECONDS
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        for number, process in enumerate(self._processes):
            if not self._worker_busy(number):  # a worker still inside keeps its pipes
                process.close()

    def _work(self, convert_file: ConvertFile) -> None:
        convert = functools.partial(self._convert, convert_file)
        while True:
            _, _, job = self._jobs.get()
            if job is None:
                return
            try:
                if not self._stopping.is_set():
                    self._run_job(job, convert)
            except Exception:  # a bug must not kill the worker; the input stays put
                if not self._stopped.is_set():
                    log.exception("job_crashed", job=str(job))
            finally:
                with self._lock:
                    self._outstanding -= 1
                    if isinstance(job, Path):
                        self._queued.discard(job)
                if self._progress is not None:
                    self._progress.update()

    def _run_job(self, job: Path | Claim | _Truncated, convert: Converter) -> None:
        if isinstance(job, Claim):
            self._finish(job, convert)
            return
        path = job.path if isinstance(job, _Truncated) else job
        try:
            claim = self.spool.claim(path)
        except OSError as error:
            log.warning("claim_failed", input=str(path), error=str(error))
            return  # still in the inbox: the next rescan offers it again
        finally:
            with self._lock:
                self._queued.discard(path)
        if claim is None:
            return
        truncated = isinstance(job, _Truncated)
        self._finish(claim, _reject_truncated(self.settings) if truncated else convert)

    def _finish(self, claim: Claim, convert: Converter) -> None:
        with self._lock:
            crashes, reason = self._crashes.get(claim.folder, (0, ""))
        if crashes >= self.settings.max_attempts:
            convert = _reject_crashed(claim, crashes, reason)
        try:
            outcome = self.spool.handle(claim, convert)
        except _Cancelled:
            return
        except Exception as error:
            if self._stopping.is_set():  # left claimed for the next start
                # A conversion killed by the stop is not news; other trouble is.
                if not isinstance(error, ConversionCrashed) and not self._stopped.is_set():
                    log.warning("input_deferred", input=str(claim.relative), error=str(error))
                return
            if isinstance(error, OSError) and not isinstance(error, ConversionCrashed):
                self._retry_later(claim, error)
            else:
                self._crashed(claim, error, convert)
            return
        with self._lock:
            self._attempts.pop(claim.folder, None)
            self._crashes.pop(claim.folder, None)
        if self._stopped.is_set():
            return
        if isinstance(outcome, Converted):
            with self._lock:
                self.tally.converted += 1
            self.metrics.observe_converted(float(outcome.summary.get("seconds", 0.0)))
            log.info("input_converted", **outcome.summary)
        elif isinstance(outcome, Failed):
            with self._lock:
                self.tally.failed += 1
            record = outcome.record
            self.metrics.observe_failed(str(record.get("error")))
            log.warning(
                "input_failed",
                input=record.get("input", str(claim.relative)),
                error=record.get("error"),
                message=record.get("message"),
                failed_as=str(outcome.failed_as),
            )

    def _retry_later(self, claim: Claim, error: OSError) -> None:
        """Environmental trouble: keep the input claimed and try again later."""
        if self._once:
            with self._lock:
                self.tally.deferred += 1
            log.warning("input_deferred", input=str(claim.relative), error=str(error))
            return
        with self._lock:
            attempt = self._attempts.get(claim.folder, 0) + 1
            self._attempts[claim.folder] = attempt
        self._schedule_retry(claim, attempt, str(error))

    def _crashed(self, claim: Claim, error: Exception, convert: Converter) -> None:
        """A crashed conversion (guarantee 13): tried again, up to `max_attempts` in all,
        then the input fails as conversion_crashed (also with `--once`)."""
        if isinstance(error, ConversionCrashed):
            reason = str(error)
        else:  # an unexpected exception in this process (a converter given in tests)
            reason = f"conversion raised {type(error).__name__}: {error}"
        with self._lock:
            crashes = self._crashes.get(claim.folder, (0, ""))[0] + 1
            self._crashes[claim.folder] = (crashes, reason)
        if crashes >= self.settings.max_attempts:
            self._finish(claim, convert)  # turned into the rejection
            return
        self._schedule_retry(claim, crashes, reason, crashed=True)

    def _schedule_retry(
        self, claim: Claim, attempt: int, error: str, *, crashed: bool = False
    ) -> None:
        delay = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (attempt - 1))
        with self._lock:
            heapq.heappush(self._retries, (time.monotonic() + delay, next(self._order), claim))
        fields: dict[str, Any] = {"crashed": True} if crashed else {}
        log.warning(
            "input_retrying",
            input=str(claim.relative),
            error=error,
            attempt=attempt,
            retry_in=delay,
            **fields,
        )

    def _convert(self, convert_file: ConvertFile, claim: Claim) -> dict[str, Any]:
        """Resolve the reference and convert; the summary becomes `input_converted`."""
        settings = self.settings
        try:
            match = self.library.resolve(claim.name)
        except ConversionError:
            if self._stopping.is_set():  # woken by the stop, not by a reference
                raise _Cancelled from None
            raise
        if self._stopping.is_set():
            raise _Cancelled
        affine = None
        if match.rule == "identity" and settings.default_affine is not None:
            import numpy as np

            affine = np.asarray(settings.default_affine, dtype=np.float64)
        result = convert_file(
            claim.path,
            self.spool.outbox / claim.subfolder,
            settings=settings,
            reference=match.reference,
            stem=claim.stem,
            affine=affine,
            provenance={"input": str(claim.relative), "rule": match.rule},
            owner=self.spool.owner_for(claim),  # its temporaries: removed if it dies
            # With rename or fail: what a redo after a crash recognises as its own.
            journal=claim.folder / COMMIT_RECORD if self.spool.remember_conversions else None,
        )
        outputs = [str(path) for path in result.outputs]
        return {
            "input": str(claim.relative),
            "reference": None if match.reference is None else str(match.reference),
            "rule": match.rule,
            "output": outputs[0] if len(outputs) == 1 else outputs,
            "shape": list(result.shape_out),
            "dtype_in": result.dtype_in,
            "dtype_out": result.dtype_out,
            "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out,
            "seconds": round(result.seconds, 6),
        }


def _reject_crashed(claim: Claim, crashes: int, reason: str) -> Converter:
    def reject(_: Claim) -> dict[str, Any]:
        raise ConversionError(
            ErrorCode.CONVERSION_CRASHED,
            f"{claim.relative}: expected its conversion to finish, found it crashed on "
            f"each of {crashes} attempts (max_attempts); the last time: {reason}",
        )

    return reject


def _log_failure(error: BaseException) -> None:
    """`service_failed` for what stops the service without being its configuration."""
    if isinstance(error, ServiceError | OSError):
        log.error("service_failed", error=str(error), error_type=type(error).__name__)


def _reject_truncated(settings: Settings) -> Converter:
    def reject(claim: Claim) -> dict[str, Any]:
        raise ConversionError(
            ErrorCode.TRUNCATED,
            f"{claim.relative}: expected a complete file (every declared byte present), "
            f"found it incomplete and unchanged for {settings.incomplete_timeout:g} s",
        )

    return reject


def _identity(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)


def _mtime_ns(path: Path) -> int:
    try:
        return path.lstat().st_mtime_ns
    except OSError:
        return 0
