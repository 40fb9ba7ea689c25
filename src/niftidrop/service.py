"""The service (README: File protocol, Logs): `startup()` → `main_loop()` → `shutdown()`.

The main thread owns every decision: it reads sightings from the inbox watcher,
asks the readiness tracker which files may be read (`niftidrop.intake`),
rescans, retries, writes the heartbeat and talks to systemd; its periodic tasks
are listed in `main_loop`. Worker threads only take jobs (an inbox path to
claim, or a claim to finish) from one priority queue ordered by modification
time, so a backlog goes oldest first; each converts in a child process of its
own (`niftidrop.workers`). Signal handlers only set flags.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Final, Protocol

from niftidrop import fs_probe
from niftidrop.errors import ConfigError, ServiceError
from niftidrop.guard import SpoolGuard
from niftidrop.intake import Intake
from niftidrop.logs import ProgressBar, get_logger
from niftidrop.observers import choose_observer
from niftidrop.periodic import Periodic, Task
from niftidrop.spool import Spool
from niftidrop.status_board import StatusBoard
from niftidrop.status_page import StatusPage
from niftidrop.systemd import SystemdNotifier
from niftidrop.version import __version__
from niftidrop.workers import WorkerPool

if TYPE_CHECKING:
    from pathlib import Path

    from niftidrop.convert import ConvertFile
    from niftidrop.library import Match
    from niftidrop.metrics import Metrics
    from niftidrop.settings import Settings
    from niftidrop.watcher import InboxWatcher

# The longest the main loop blocks: how soon it notices a signal's flag.
LOOP_TICK_SECONDS: Final = 0.25

log = get_logger()


class Library(Protocol):
    """What the service needs of the reference library."""

    def build(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def resolve(self, name: str, profile: str | None = None, /) -> Match: ...
    def __len__(self) -> int: ...


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
        self.ready = threading.Event()  # set once the service is fully up
        self.stop_requested = False  # set by signal handlers: plain flags only
        self._force_stop = False
        self._rescan_requested = False
        self._pool = WorkerPool(
            settings,
            self.spool,
            resolve=library.resolve,
            metrics=metrics,
            convert_file=convert_file,
        )
        self.tally = self._pool.jobs.tally
        self._intake = Intake(settings, self.spool, self._pool)
        self._watcher: InboxWatcher | None = None
        self._guard = SpoolGuard(self.spool)
        self._board: StatusBoard | None = None  # the status page's memory, when served
        self._once = False
        self._last_tick = time.monotonic()

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
        self._once = self._pool.jobs.once = once
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
        _create_library_folders(settings.all_library_dirs)
        self.spool.lock()
        self._guard.start()
        _check_file_system(settings, self.spool)
        self._pool.start_processes()  # they import while the library is indexed
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
            library=[str(folder) for folder in settings.all_library_dirs],
            workers=settings.workers,
            observer=observer,
        )
        if self._once:
            self.library.build()
        else:
            self.library.start()  # watch first, then walk: nothing added meanwhile is missed
        _library_indexed(self.library, self.metrics, self.settings.all_library_dirs)
        if settings.metrics_address and not self._once:
            self._board = StatusBoard(
                self.spool,
                quick_interval=settings.heartbeat_interval,
                full_interval=settings.rescan_interval,
            )
            self._board.start()  # before any input finishes: each one is recorded
            self._pool.jobs.record = self._board.record
        self._pool.recover()
        if observer is not None:
            self._watcher = self._intake.watcher(observer)
            self._watcher.start()
        self._intake.rescan()
        self._pool.start()
        if self._board is not None and settings.metrics_address:
            self.metrics.serve(
                settings.metrics_address, self.healthy, StatusPage(self._board).respond
            )
        self.notifier.notify("READY=1")
        self.notifier.notify(f"STATUS=watching {self.spool.inbox}")
        self._write_heartbeat()
        self.ready.set()
        log.info("service_ready", inbox=str(self.spool.inbox), backlog=len(self._intake))
        if self._once and sys.stderr.isatty():
            # Log lines go above it; it is erased at the end (`service_stopped` sums up).
            total = self._pool.outstanding + len(self._intake)
            self._pool.progress = ProgressBar(total, leave=False)

    def main_loop(self) -> None:
        settings = self.settings
        now = time.monotonic()
        check_period = min(max(settings.settle_seconds / 4, 0.05), 0.5)
        once_deadline = now + settings.settle_seconds + 2 * check_period
        interval = self.notifier.watchdog_interval
        tasks: list[Task] = [
            # Files still settling: is any ready now?
            Periodic(self._intake.decide, check_period, now, wanted=lambda: len(self._intake) > 0),
            self._pool.retries,
            Periodic(
                self._rescan,
                settings.rescan_interval,
                now + settings.rescan_interval,
                wanted=lambda: not self._once,
                asked=lambda: self._rescan_requested,
            ),
            Periodic(self._beat, settings.heartbeat_interval, now + settings.heartbeat_interval),
        ]
        if interval:
            tasks.append(Periodic(lambda: self.notifier.notify("WATCHDOG=1"), interval, now))
        while not self.stop_requested:
            now = time.monotonic()
            self._last_tick = now
            wake = min(now + LOOP_TICK_SECONDS, *(task.when() for task in tasks))
            finished = self._intake.take_sightings(timeout=max(0.0, wake - now))
            now = time.monotonic()
            if finished:
                self._intake.decide(finished)  # a closed or moved-in file: no need to wait
            for task in tasks:
                task.run(now)
            outstanding = self._pool.outstanding
            self.metrics.set_queue_depth(outstanding)
            if self._once and self._once_done(outstanding, now >= once_deadline):
                return

    def _rescan(self) -> None:
        if self._rescan_requested:
            self._rescan_requested = False
            self.library.build()
            _library_indexed(self.library, self.metrics, self.settings.all_library_dirs)
        self._intake.rescan()

    def _beat(self) -> None:
        self._guard.check()  # raises ServiceError when it cannot go on
        self._write_heartbeat()
        self._pool.adopt()  # the claims of instances that died meanwhile

    def _once_done(self, outstanding: int, patience_over: bool) -> bool:
        """`run --once` ends when every job is done and nothing is still settling."""
        if outstanding or len(self._pool.retries) or not self._pool.deliveries.idle():
            return False
        if len(self._intake) and not patience_over:
            return False
        self.tally.incomplete += self._intake.report_waiting()
        return True

    def shutdown(self) -> None:
        log.info("service_stopping", force=self._force_stop)
        self.notifier.notify("STOPPING=1")
        self._pool.stop_taking()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        # Wakes the jobs waiting for a late reference: they give up, inputs left claimed.
        self.library.stop()
        left = self._pool.stop(force=lambda: self._force_stop)
        if left:
            log.warning("inputs_left_claimed", inputs=left, reason="stopped before they finished")
        if self._pool.progress is not None:
            self._pool.progress.close()
        self._write_heartbeat(state="stopped")
        self._release()
        self._pool.stopped()
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
        if self._board is not None:
            self._board.stop()
        self._pool.release()
        self.spool.remove_spare_folders()
        self.spool.unlock()
        self.notifier.close()

    # The heartbeat and the spool underfoot.

    def _write_heartbeat(self, state: str = "running") -> None:
        """The heartbeat file; `state` "stopped" tells `health` the service is gone."""
        outstanding = self._pool.outstanding
        try:
            self.spool.write_heartbeat(
                {
                    "state": state,
                    "queued": outstanding,
                    "waiting": len(self._intake),
                    "converted": self.tally.converted,
                    "failed": self.tally.failed,
                }
            )
        except OSError as error:
            log.warning("heartbeat_failed", error=str(error))


def _check_file_system(settings: Settings, spool: Spool) -> None:
    """Refuse to start (ConfigError, exit 2) when the lease would not outlive two
    heartbeats or the spool's file system lacks what the file protocol needs (found
    by trying it: `file_system`, and `file_system_limited` for each gap it can do
    without)."""
    settings.check_lease()
    capabilities = fs_probe.probe(spool.instance_folder)
    log.info("file_system", state=str(spool.state), **{c.name: c.works for c in capabilities})
    for item in capabilities:
        if not item.works and not item.needed:
            log.warning("file_system_limited", capability=item.name, detail=item.detail)
    missing = fs_probe.missing(capabilities)
    if missing:
        raise ConfigError(
            f"state_dir: the file system of {spool.state} lacks what the file protocol "
            "needs: " + "; ".join(missing) + " (README: Many instances, one spool)"
        )


def _log_failure(error: BaseException) -> None:
    """`service_failed` for what stops the service without being its configuration."""
    if isinstance(error, ServiceError | OSError):
        log.error("service_failed", error=str(error), error_type=type(error).__name__)


def _create_library_folders(folders: list[Path]) -> None:
    """Create missing library folders, so a fresh set-up has a place for references
    and the library watch starts on a real folder. A read-only library that is
    missing is reported, not fatal: references may be mounted there later."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            log.warning("library_unavailable", folder=str(folder), error=str(error))


def _library_indexed(library: Library, metrics: Metrics, folders: list[Path]) -> None:
    """Count and log the references indexed; warn when there are none."""
    size = len(library)
    metrics.set_library_size(size)
    log.info("library_indexed", references=size)
    if size == 0:
        log.warning(
            "library_empty",
            library=[str(folder) for folder in folders],
            message="no reference NIfTI files: inputs will fail as no_reference",
        )
