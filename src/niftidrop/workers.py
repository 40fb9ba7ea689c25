"""The service's worker pool (README: Running the service): threads, queue, processes.

Worker threads take jobs from one priority queue ordered by modification time,
so a backlog goes oldest first; an inbox path waits in it once. Conversions run
in `workers` child processes (`niftidrop.processes`): the interpreter lock would
let threads run only one conversion's Python at a time. There are
THREADS_PER_PROCESS worker threads per process, each borrowing a process with a
free place for a conversion (`SharedProcesses`; CALLS_IN_FLIGHT places each), so
a process converts the next input while the thread of the last one finishes it,
and has the request after that waiting in its pipe. What a worker does with a
job is `niftidrop.jobs`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from niftidrop.errors import ServiceError
from niftidrop.hooks import Deliveries
from niftidrop.jobs import Job, JobRunner, Retries
from niftidrop.logs import get_logger
from niftidrop.processes import ConversionCrashed, ConversionProcess

if TYPE_CHECKING:
    from niftidrop.convert import ConvertFile
    from niftidrop.library import Resolve
    from niftidrop.logs import ProgressBar
    from niftidrop.metrics import Metrics
    from niftidrop.settings import Settings
    from niftidrop.spool import Spool

# At a stop: how long a worker whose conversion process was killed has to notice.
KILLED_JOB_SECONDS: Final = 5.0
# Calls a conversion process is lent at once: while it converts one, the next
# waits in its pipe, so it starts as soon as the last reply is written rather than
# when the worker given that reply gets this process's interpreter lock and
# another worker has sent a request (README: Performance).
CALLS_IN_FLIGHT: Final = 2
# Worker threads per conversion process. Besides converting, a job claims its input
# and finishes it (records, the link into the archive and its fsync, the log line):
# on small inputs about as long as the conversion. CALLS_IN_FLIGHT of them wait on
# the process while another claims or finishes.
THREADS_PER_PROCESS: Final = CALLS_IN_FLIGHT + 1

log = get_logger()


class WorkerPool:
    """The worker threads of one service, their conversion processes and their jobs."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        *,
        resolve: Resolve,
        metrics: Metrics,
        convert_file: ConvertFile | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.retries = Retries(self.submit)
        self.jobs = JobRunner(settings, spool, self.retries, resolve=resolve, metrics=metrics)
        # The hand-off's events, on threads of their own (README: Hand-off).
        self.deliveries = Deliveries(settings, spool.events)
        self.progress: ProgressBar | None = None  # a bar advanced per job done (`--once`)
        # None: `niftidrop.api.convert_file` in a child process per worker; a
        # converter given here (tests) runs in the worker threads themselves.
        self._convert_file = convert_file
        self._processes = SharedProcesses([])
        self._queue: queue.PriorityQueue[tuple[int, int, Job | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._queued: set[Path] = set()  # inbox paths waiting in `_queue`
        self._lock = threading.Lock()
        self._outstanding = 0  # jobs queued or running
        self._workers: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"WorkerPool(workers={self.settings.workers}, outstanding={self.outstanding})"

    @property
    def outstanding(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._outstanding

    def queued(self, path: Path) -> bool:
        """Whether the inbox file `path` waits in the queue already."""
        with self._lock:
            return path in self._queued

    def submit(self, job: Job, mtime_ns: int) -> None:
        """Queue `job` (an inbox path only once), older `mtime_ns` first."""
        with self._lock:
            if _waits_once(job):
                if job.path in self._queued:
                    return
                self._queued.add(job.path)
            self._outstanding += 1
        self._queue.put((mtime_ns, next(self._order), job))

    # Life cycle.

    def recover(self) -> None:
        """Queue the claims an earlier run left, once its stale temporaries are gone."""
        removed = self.spool.remove_stale_temporaries()
        claims = self.spool.claims()
        if removed or claims:
            log.info("spool_recovered", claims=len(claims), temporary_files_removed=removed)
        for claim in claims:
            self.submit(Job.claimed(claim), _mtime_ns(claim.path))
        self.adopt()
        self.deliveries.start()  # the events it left, its claims known (their redo)

    def adopt(self) -> None:
        """Adopt the events and claims of instances whose lease expired (and the claims
        of an earlier version) and queue them."""
        expired = self.spool.expired_instances()  # one look serves events and claims
        if self.spool.events is not None:  # before the claims: see EventStore.adopt
            for instance, count in self.spool.events.adopt(expired):
                log.info("events_adopted", instance=instance, count=count, by=self.spool.instance)
        for instance, claims in self.spool.adopt(expired):
            log.info("claim_adopted", instance=instance, count=len(claims), by=self.spool.instance)
            for claim in claims:
                self.submit(Job.claimed(claim), _mtime_ns(claim.path))

    def start_processes(self) -> None:
        """Start the conversion processes without waiting for them (see `start`)."""
        if self._convert_file is not None:
            return
        # Replies carry a ConversionResult: its module (numpy, nibabel) is imported
        # now rather than when the first conversion is done.
        import niftidrop.api  # noqa: F401

        self._processes = SharedProcesses(
            [
                ConversionProcess(
                    max_memory=self.settings.max_memory,
                    timeout=self.settings.conversion_timeout,
                    on_output=self._process_output,
                )
                for _ in range(self.settings.workers)
            ],
            calls_in_flight=CALLS_IN_FLIGHT,
        )
        for process in self._processes.all:
            process.start()

    def start(self) -> None:
        """Wait for the conversion processes, then start THREADS_PER_PROCESS worker
        threads for each (one per worker for a converter given to run in them)."""
        threads = self.settings.workers
        for process in self._processes.all:
            try:
                process.wait_ready()
            except ChildProcessError as error:
                raise ServiceError(f"a conversion process did not start: {error}") from None
        if self._convert_file is None:
            threads *= THREADS_PER_PROCESS
        for number in range(threads):
            worker = threading.Thread(
                target=self._work, name=f"niftidrop-worker-{number}", daemon=True
            )
            worker.start()
            self._workers.append(worker)

    def stop_taking(self) -> None:
        """Workers take no new job; a job waiting for its reference gives up."""
        self.jobs.stopping.set()

    def stop(self, *, force: Callable[[], bool]) -> int:
        """Let the workers finish their jobs (up to `shutdown_timeout`, unless `force()`),
        then end the conversion processes, and let the deliveries in flight finish
        within the same deadline; returns how many jobs were left running."""
        for _ in self._workers:
            self._queue.put((-1, next(self._order), None))
        deadline = time.monotonic() + self.settings.shutdown_timeout
        for worker in self._workers:
            while worker.is_alive() and not force() and time.monotonic() < deadline:
                worker.join(timeout=0.1)
        left = sum(worker.is_alive() for worker in self._workers)
        self._stop_processes(force())
        self.deliveries.stop(deadline, force=force)  # the rest of the same deadline
        return left

    def stopped(self) -> None:
        """The service is stopping for good: nothing about an input is logged any more."""
        self.jobs.stopped.set()

    def release(self) -> None:
        """End the conversion processes (closed already after a normal stop)."""
        self._processes.stop_lending()
        busy = self._processes.busy()
        for process in self._processes.all:
            process.kill()
            if process not in busy:
                process.close()

    def _process_output(self, pid: int, report: Mapping[str, Any]) -> None:
        """Log what a conversion process reported (on its own thread, see processes)."""
        if self.jobs.stopped.is_set():
            return
        fields = dict(report)
        event = str(fields.pop("event", "conversion_process_output"))
        level = str(fields.pop("level", "warning"))
        fields["pid"] = pid
        if level not in ("debug", "info", "warning", "error"):
            level = "warning"
        getattr(log, level)(event, **fields)

    def _stop_processes(self, force: bool) -> None:
        """Close the idle conversion processes; kill those still converting.

        No process is lent any more, so a worker still waiting for one leaves its
        input claimed. A killed conversion ends its job at once (its input stays
        claimed); the worker is given a moment to notice, so that nothing about
        the input is logged after `service_stopped`.
        """
        self._processes.stop_lending()
        for process in self._processes.all if force else self._processes.busy():
            process.kill()
        deadline = time.monotonic() + KILLED_JOB_SECONDS
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        busy = self._processes.busy()  # a worker still inside keeps its pipes
        for process in self._processes.all:
            if process not in busy:
                process.close()

    # Jobs (on the worker threads).

    def _work(self) -> None:
        while True:
            mtime_ns, order, job = self._queue.get()
            if job is None:
                return
            convert_file = self._convert_file or self._processes.converter((mtime_ns, order))
            try:
                if not self.jobs.stopping.is_set():
                    self._run_job(job, convert_file)
            except Exception:  # a bug must not kill the worker; the input stays put
                if not self.jobs.stopped.is_set():
                    log.exception("job_crashed", job=str(job))
            finally:
                with self._lock:
                    self._outstanding -= 1
                    if _waits_once(job):
                        self._queued.discard(job.path)
                if self.progress is not None:
                    self.progress.update()

    def _run_job(self, job: Job, convert_file: ConvertFile) -> None:
        claim = job.claim
        if claim is None:
            try:
                claim = self.spool.claim(job.path)
            except OSError as error:
                log.warning("claim_failed", input=str(job.path), error=str(error))
                return  # still in the inbox: the next rescan offers it again
            finally:
                with self._lock:
                    self._queued.discard(job.path)
            if claim is None:
                return
        self.jobs.finish(job, claim, convert_file)


class SharedProcesses:
    """The conversion processes, each lent to up to `calls_in_flight` worker threads
    at a time (see `ConversionProcess`: their calls are converted in turn).

    `converter(priority)` is a job's `convert_file`: it waits for a process with a
    free place, the least busy one, and converts in it. Of the jobs waiting, the
    one first in the queue's order (`priority`) is lent the next place, so a
    backlog still converts oldest first, give or take the jobs that asked at the
    same moment. After
    `stop_lending` a call fails as crashed, which at a stop leaves the input
    claimed, as a killed conversion does.
    """

    def __init__(self, processes: list[ConversionProcess], *, calls_in_flight: int = 1) -> None:
        self.all = processes
        self._calls_in_flight = calls_in_flight
        # A process once per call it may still be lent, the one given back last last.
        self._free = list(processes) * calls_in_flight
        self._waiting: set[tuple[int, int]] = set()  # the priorities of the jobs waiting
        self._changed = threading.Condition()
        self._lending = True

    def __repr__(self) -> str:
        return f"SharedProcesses({len(self.all)}, busy={len(self.busy())}, waiting={self.waiting})"

    @property
    def waiting(self) -> int:
        """Jobs waiting for a process now."""
        with self._changed:
            return len(self._waiting)

    def converter(self, priority: tuple[int, int]) -> ConvertFile:
        """The `convert_file` of the job `priority` ((mtime_ns, order) in the queue)."""
        return _Lent(self, priority)

    def convert(self, priority: tuple[int, int], *args: Any, **kwargs: Any) -> Any:
        """Convert in the next process lent to `priority`; the process's result."""
        with self._changed:
            self._waiting.add(priority)
            try:
                while self._lending and not (self._free and min(self._waiting) == priority):
                    self._changed.wait()
            finally:
                self._waiting.discard(priority)
                self._changed.notify_all()  # the next in line may be lent the rest
            if not self._lending:
                raise ConversionCrashed("the service is stopping: no conversion process is lent")
            # The least busy; of those, the one given back last: its caches are warm.
            process = max(reversed(self._free), key=self._free.count)
            self._free.remove(process)
        try:
            return process(*args, **kwargs)
        finally:
            with self._changed:
                self._free.append(process)
                self._changed.notify_all()

    def busy(self) -> list[ConversionProcess]:
        """The processes lent out now."""
        with self._changed:
            return [
                process for process in self.all if self._free.count(process) < self._calls_in_flight
            ]

    def stop_lending(self) -> None:
        """Lend no process any more; the jobs waiting for one are told so."""
        with self._changed:
            self._lending = False
            self._changed.notify_all()


@dataclass(frozen=True)
class _Lent:
    """One job's `convert_file`: a conversion in a process lent in the job's turn."""

    processes: SharedProcesses
    priority: tuple[int, int]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.processes.convert(self.priority, *args, **kwargs)


def _waits_once(job: Job) -> bool:
    """An inbox file is queued once (`submit`); a truncated one is handed on regardless."""
    return job.claim is None and not job.truncated


def _mtime_ns(path: Path) -> int:
    try:
        return path.lstat().st_mtime_ns
    except OSError:
        return 0
