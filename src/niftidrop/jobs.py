"""The jobs of the service's workers (README: Running the service): what one is, how it runs.

A job is an input to take to its end: claimed from the inbox first, or claimed
already. `JobRunner` finishes a claim through the spool, converting it with the
reference matched to it (or rejecting it), and logs, counts or retries what
came of it: an environmental error keeps the input claimed and is tried again
with a growing delay (`Retries`); a crashed conversion is tried again up to
`max_attempts` times in all (guarantee 13). At a stop, a job that still waits
(for its reference) leaves its input claimed.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from niftidrop.claiming import ClaimLost
from niftidrop.claims import COMMIT_RECORD, Claim, Converted, Failed, Outcome
from niftidrop.convert import ConvertFile, convert_input
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.logs import get_logger
from niftidrop.processes import ConversionCrashed
from niftidrop.profiles import Profiles
from niftidrop.spool import Spool

if TYPE_CHECKING:
    from niftidrop.library import Match, Resolve
    from niftidrop.metrics import Metrics
    from niftidrop.settings import Settings

MAX_RETRY_SECONDS: Final = 60.0
FIRST_RETRY_SECONDS: Final = 0.5

log = get_logger()


@dataclass(frozen=True)
class Job:
    """An input for a worker to take to its end.

    Either a file still in the inbox (`claim` None), claimed first, or an input
    claimed already (found at start, or due for a retry). A `truncated` inbox
    file (still incomplete after `incomplete_timeout`) fails as truncated once
    claimed, unread.
    """

    path: Path  # in the inbox, or the claimed input
    claim: Claim | None = None
    truncated: bool = False

    @classmethod
    def claimed(cls, claim: Claim) -> Job:
        """The job of finishing `claim`."""
        return cls(claim.path, claim)

    def __str__(self) -> str:
        return str(self.path)


class _Cancelled(Exception):
    """The stop came while a job waited (for its reference): its input stays claimed."""


@dataclass
class Tally:
    """What the service did, for `run --once`'s exit code and the heartbeat."""

    converted: int = 0
    failed: int = 0
    deferred: int = 0  # left claimed after an environmental error (`--once`)
    incomplete: int = 0  # left in the inbox, never complete (`--once`)


class Retries:
    """Claims to try again later (a heap by due time), and what each cost so far.

    Environmental errors in a row and crashed conversions are counted per claim
    folder until the claim ends. Workers schedule; the main thread resubmits what
    is due (`run`), so this is one of its periodic tasks.
    """

    def __init__(self, submit: Callable[[Job, int], None]) -> None:
        self._submit = submit
        self._lock = threading.Lock()
        self._order = itertools.count()
        self._retries: list[tuple[float, int, Claim]] = []  # heap of (due, order, claim)
        self._attempts: dict[Path, int] = {}  # claim folder → environmental errors in a row
        # Claim folder → crashed conversions (guarantee 13) and what ended the last.
        self._crashes: dict[Path, tuple[int, str]] = {}

    def __len__(self) -> int:
        return len(self._retries)

    def environmental(self, claim: Claim, error: OSError) -> None:
        """Environmental trouble: keep the input claimed and try again later."""
        with self._lock:
            attempt = self._attempts.get(claim.folder, 0) + 1
            self._attempts[claim.folder] = attempt
        self._schedule(claim, attempt, str(error))

    def crashed(self, claim: Claim, reason: str, max_attempts: int) -> bool:
        """Count a crashed conversion; try it again unless it was the `max_attempts`th
        (then False: it fails as conversion_crashed)."""
        with self._lock:
            crashes = self._crashes.get(claim.folder, (0, ""))[0] + 1
            self._crashes[claim.folder] = (crashes, reason)
        if crashes >= max_attempts:
            return False
        self._schedule(claim, crashes, reason, crashed=True)
        return True

    def crashes(self, claim: Claim) -> tuple[int, str]:
        """How many conversions of `claim` crashed, and what ended the last."""
        with self._lock:
            return self._crashes.get(claim.folder, (0, ""))

    def forget(self, claim: Claim) -> None:
        """The claim ended: its counts start again should its folder be reused."""
        with self._lock:
            self._attempts.pop(claim.folder, None)
            self._crashes.pop(claim.folder, None)

    def _schedule(self, claim: Claim, attempt: int, error: str, *, crashed: bool = False) -> None:
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

    # A periodic task of the main loop.

    def when(self) -> float:
        """When the next retry is due (infinity: none waits)."""
        with self._lock:
            return self._retries[0][0] if self._retries else float("inf")

    def run(self, now: float) -> None:
        """Hand every retry that is due to the workers."""
        due = []
        with self._lock:  # workers push onto the heap
            while self._retries and self._retries[0][0] <= now:
                due.append(heapq.heappop(self._retries)[2])
        for claim in due:
            self._submit(Job.claimed(claim), 0)


class JobRunner:
    """What a worker does with a claim: convert it (or reject it), finish it in the
    spool, and log, count or retry what came of it."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        retries: Retries,
        *,
        resolve: Resolve,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.profiles = Profiles(settings)  # each input converts with its profile's
        self.spool = spool
        self.retries = retries
        self.metrics = metrics
        self.tally = Tally()
        self.once = False  # `run --once`: an environmental error defers, no retry
        self.stopping = threading.Event()  # workers take no new job
        # Set just before `service_stopped`: nothing about an input is logged after it.
        self.stopped = threading.Event()
        self._resolve_reference = resolve
        self._lock = threading.Lock()  # the tally's
        self.record: Callable[[Outcome], None] | None = None  # the status page's memory

    def __repr__(self) -> str:
        return f"JobRunner({self.spool!r})"

    def finish(self, job: Job, claim: Claim, convert_file: ConvertFile) -> None:
        """Take `claim` (of `job`) to its end, converting with `convert_file`."""
        try:
            outcome = self.spool.handle(claim, lambda _: self._convert(job, claim, convert_file))
        except _Cancelled:
            return
        except ClaimLost:
            self._lost(claim)
            return
        except Exception as error:
            if isinstance(error, OSError) and not os.path.lexists(claim.folder):
                self._lost(claim)  # adopted by another instance mid-way
                return
            if self.stopping.is_set():  # left claimed for the next start
                # A conversion killed by the stop is not news; other trouble is.
                if not isinstance(error, ConversionCrashed) and not self.stopped.is_set():
                    log.warning("input_deferred", input=str(claim.relative), error=str(error))
                return
            if isinstance(error, OSError) and not isinstance(error, ConversionCrashed):
                self._retry_later(claim, error)
            else:
                self._crashed(job, claim, error, convert_file)
            return
        self.retries.forget(claim)
        if self.stopped.is_set():
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
        if outcome is not None and self.record is not None:
            self.record(outcome)

    def _lost(self, claim: Claim) -> None:
        """Another instance adopted the claim (this one was paused past its lease):
        drop it, touching nothing of it."""
        self.retries.forget(claim)
        log.warning(
            "claim_lost",
            input=str(claim.relative),
            instance=self.spool.instance,
            message="adopted by another instance while this one was paused past its lease",
        )

    def _retry_later(self, claim: Claim, error: OSError) -> None:
        """Environmental trouble: keep the input claimed and try again later."""
        if self.once:
            with self._lock:
                self.tally.deferred += 1
            log.warning("input_deferred", input=str(claim.relative), error=str(error))
            return
        self.retries.environmental(claim, error)

    def _crashed(self, job: Job, claim: Claim, error: Exception, convert_file: ConvertFile) -> None:
        """A crashed conversion (guarantee 13): tried again, up to `max_attempts` in all,
        then the input fails as conversion_crashed (also with `--once`)."""
        if isinstance(error, ConversionCrashed):
            reason = str(error)
        else:  # an unexpected exception in this process (a converter given in tests)
            reason = f"conversion raised {type(error).__name__}: {error}"
        if not self.retries.crashed(claim, reason, self.settings.max_attempts):
            self.finish(job, claim, convert_file)  # turned into the rejection

    def _convert(self, job: Job, claim: Claim, convert_file: ConvertFile) -> dict[str, Any]:
        """Resolve the reference and convert; the summary becomes `input_converted`.

        An input that may not be converted is rejected here, with `Spool.handle`
        finishing its claim as for any rejection: one whose conversion crashed
        `max_attempts` times, and a truncated one.
        """
        settings = self.settings
        crashes, reason = self.retries.crashes(claim)
        if crashes >= settings.max_attempts:
            raise ConversionError(
                ErrorCode.CONVERSION_CRASHED,
                f"{claim.relative}: expected its conversion to finish, found it crashed on "
                f"each of {crashes} attempts (max_attempts); the last time: {reason}",
            )
        if job.truncated:
            raise ConversionError(
                ErrorCode.TRUNCATED,
                f"{claim.relative}: expected a complete file (every declared byte present), "
                f"found it incomplete and unchanged for {settings.incomplete_timeout:g} s",
            )
        profile, settings = self.profiles.choose(str(claim.relative))
        match = self._resolve(claim.name, profile)
        result = convert_input(
            claim.path,
            self.spool.outbox / claim.subfolder,
            match,
            settings=settings,
            convert_file=convert_file,
            stem=claim.stem,
            provenance={"input": str(claim.relative), "profile": profile},
            owner=self.spool.owner_for(claim),  # its temporaries: removed if it dies
            # With rename or fail: what a redo after a crash recognises as its own.
            journal=claim.folder / COMMIT_RECORD if self.spool.remember_conversions else None,
        )
        if result.labels_missing:  # not an error: the output is written all the same
            missing = list(result.labels_missing)
            log.warning("labels_incomplete", input=str(claim.relative), values=missing)
        outputs = [str(path) for path in result.outputs]
        if result.preview_error is not None:  # the input converted all the same
            log.warning("preview_failed", input=str(claim.relative), error=result.preview_error)
        return {
            "input": str(claim.relative),
            "reference": None if match.reference is None else str(match.reference),
            "rule": match.rule,
            "profile": profile,
            "output": outputs[0] if len(outputs) == 1 else outputs,
            "shape": list(result.shape_out),
            "dtype_in": result.dtype_in,
            "dtype_out": result.dtype_out,
            "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out,
            "seconds": round(result.seconds, 6),
            **{kind: str(path) for kind, path in result.beside.items()},  # sidecar, dseg
            **({"preview": str(result.preview)} if result.preview is not None else {}),
        }

    def _resolve(self, name: str, profile: str | None) -> Match:
        """The library's match for `name` (by `profile`'s rules), unless the stop came
        meanwhile."""
        try:
            # Without a profile as before: a library need not know of profiles.
            match = (
                self._resolve_reference(name)
                if profile is None
                else (self._resolve_reference(name, profile))
            )
        except ConversionError:
            if self.stopping.is_set():  # woken by the stop, not by a reference
                raise _Cancelled from None
            raise
        if self.stopping.is_set():
            raise _Cancelled
        return match
