"""The service (SPEC §1, §7): `startup()` → `main_loop()` → `shutdown()`.

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
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, Protocol

from niftidrop import __version__
from niftidrop.errors import ConversionError, ErrorCode, ServiceError
from niftidrop.logs import get_logger
from niftidrop.spool import Claim, Converted, Converter, Failed, Spool
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
    from niftidrop.processes import ConversionProcess
    from niftidrop.settings import Settings

MAX_RETRY_SECONDS: Final = 60.0
FIRST_RETRY_SECONDS: Final = 0.5
# The longest the main loop blocks: how soon it notices a signal's flag.
LOOP_TICK_SECONDS: Final = 0.25

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


@dataclass
class Tally:
    """What the service did, for `run --once`'s exit code and the heartbeat."""

    converted: int = 0
    failed: int = 0
    deferred: int = 0  # left claimed after an environmental error (`--once`)


class Service:
    """The long-running converter of one spool (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        library: Library | None = None,
        convert_file: ConvertFile | None = None,
        is_complete: Callable[[Path], bool] | None = None,
        metrics: Metrics | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        if library is None:
            from niftidrop.library import ReferenceLibrary

            library = ReferenceLibrary.from_settings(settings)
        if is_complete is None:
            from niftidrop.arrays import is_complete as default_is_complete

            is_complete = default_is_complete
        if metrics is None:
            from niftidrop.metrics import Metrics

            metrics = Metrics()
        if settings.compression_threads == 0:
            # Workers already keep every CPU busy on a backlog, and starting a thread
            # pool per file costs more than it saves on small outputs: share the CPUs.
            per_worker = max(1, (os.cpu_count() or 1) // settings.workers)
            settings = settings.model_copy(update={"compression_threads": per_worker})
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
            is_complete=is_complete,
        )
        self._sightings: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        self._watcher: InboxWatcher | None = None
        self._jobs: queue.PriorityQueue[tuple[int, int, Job]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._queued: set[Path] = set()  # inbox paths waiting in `_jobs`
        self._unreachable_seen: set[Path] = set()  # inbox paths too long to use, logged
        self._retries: list[tuple[float, int, Claim]] = []  # heap of (due, order, claim)
        self._attempts: dict[Path, int] = {}  # claim folder → failed attempts
        self._lock = threading.Lock()
        self._outstanding = 0  # jobs queued or running
        self._workers: list[threading.Thread] = []
        self._stopping = threading.Event()  # workers take no new job
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
            except BaseException:
                self._release()
                raise
            try:
                self.main_loop()
            finally:
                self.shutdown()
        if once and (self.tally.failed or self.tally.deferred or len(self._tracker)):
            return 1
        return 0

    def startup(self) -> None:
        settings = self.settings
        self.spool.create_folders()
        self._create_library_folders()
        self.spool.lock()
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
        self.library.build()
        if not self._once:
            self.library.start()
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
            log.warning("input_incomplete", input=str(self.spool.relative(path)))
        return True

    def shutdown(self) -> None:
        log.info("service_stopping", force=self._force_stop)
        self.notifier.notify("STOPPING=1")
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
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
        self._write_heartbeat()
        self._release()
        log.info(
            "service_stopped",
            converted=self.tally.converted,
            failed=self.tally.failed,
            deferred=self.tally.deferred,
        )

    def _release(self) -> None:
        """Stop the helpers startup began (each tolerates never having started)."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self.library.stop()
        self.metrics.close()
        for process in self._processes:
            process.kill()  # already closed after a normal stop
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

    def _write_heartbeat(self) -> None:
        with self._lock:
            outstanding = self._outstanding
        try:
            self.spool.write_heartbeat(
                {
                    "pid": os.getpid(),
                    "queued": outstanding,
                    "waiting": len(self._tracker),
                    "converted": self.tally.converted,
                    "failed": self.tally.failed,
                }
            )
        except OSError as error:
            log.warning("heartbeat_failed", error=str(error))

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
        from niftidrop.processes import ConversionProcess

        self._processes = [ConversionProcess() for _ in range(self.settings.workers)]
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

    def _stop_processes(self) -> None:
        """Close the conversion processes of idle workers; kill those still converting."""
        for number, process in enumerate(self._processes):
            busy = number < len(self._workers) and self._workers[number].is_alive()
            if busy or self._force_stop:
                process.kill()
            else:
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
        try:
            outcome = self.spool.handle(claim, convert)
        except OSError as error:
            self._retry_later(claim, error)
            return
        self._attempts.pop(claim.folder, None)
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
            delay = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (attempt - 1))
            heapq.heappush(self._retries, (time.monotonic() + delay, next(self._order), claim))
        log.warning(
            "input_retrying",
            input=str(claim.relative),
            error=str(error),
            attempt=attempt,
            retry_in=delay,
        )

    def _convert(self, convert_file: ConvertFile, claim: Claim) -> dict[str, Any]:
        """Resolve the reference and convert; the summary becomes `input_converted`."""
        settings = self.settings
        match = self.library.resolve(claim.name)
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


def _reject_truncated(settings: Settings) -> Converter:
    def reject(claim: Claim) -> dict[str, Any]:
        raise ConversionError(
            ErrorCode.TRUNCATED,
            f"{claim.relative}: expected a complete file (every declared byte present), "
            f"found it incomplete and unchanged for {settings.incomplete_timeout:g} s",
        )

    return reject


def _mtime_ns(path: Path) -> int:
    try:
        return path.lstat().st_mtime_ns
    except OSError:
        return 0
