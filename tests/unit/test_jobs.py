"""Tests of the workers' jobs: their shape, the retries, and how a claim is finished."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from structlog.testing import capture_logs

from niftidrop.claims import Claim, Failed
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.jobs import FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS, Job, JobRunner, Retries
from niftidrop.library import Match
from niftidrop.metrics import Metrics
from niftidrop.settings import Settings, load_settings
from niftidrop.spool import Spool


def _claim(folder: str = "/state/claimed/x", name: str = "a.npy") -> Claim:
    return Claim(Path(folder), PurePosixPath(name))


class TestJob:
    def test_an_inbox_job_and_a_claimed_one(self) -> None:
        """An inbox job has no claim; a claimed one carries it and its path."""
        claim = _claim()
        assert Job(Path("/inbox/a.npy")).claim is None
        assert Job.claimed(claim) == Job(claim.path, claim)
        assert str(Job.claimed(claim)) == str(claim.path)


class TestRetries:
    def test_environmental_errors_back_off_and_come_back_when_due(self) -> None:
        """Each error in a row doubles the delay (from FIRST_RETRY_SECONDS, at most
        MAX_RETRY_SECONDS); `run` hands the claim back once due."""
        submitted: list[Job] = []
        retries = Retries(lambda job, _: submitted.append(job))
        claim = _claim()
        with capture_logs() as logs:
            for _ in range(10):
                retries.environmental(claim, OSError(28, "No space left on device"))
        delays = [line["retry_in"] for line in logs]
        assert delays[:2] == [FIRST_RETRY_SECONDS, 2 * FIRST_RETRY_SECONDS]
        assert delays[-1] == MAX_RETRY_SECONDS
        assert len(retries) == 10
        retries.run(retries.when() - 0.001)
        assert submitted == []
        retries.run(retries.when() + MAX_RETRY_SECONDS)
        assert submitted == [Job.claimed(claim)] * 10
        assert (len(retries), retries.when()) == (0, float("inf"))

    def test_crashes_are_counted_up_to_max_attempts(self) -> None:
        """A crash is retried until the `max_attempts`th, which is not; `forget` resets."""
        retries = Retries(lambda job, _: None)
        claim = _claim()
        with capture_logs():
            assert retries.crashed(claim, "killed by SIGKILL", 3)
            assert retries.crashed(claim, "killed by SIGKILL", 3)
            assert not retries.crashed(claim, "killed by SIGSEGV", 3)
        assert retries.crashes(claim) == (3, "killed by SIGSEGV")
        retries.forget(claim)
        assert retries.crashes(claim) == (0, "")


class _Library:
    def __init__(self, reference: Path) -> None:
        self.reference = reference

    def resolve(self, name: str) -> Match:
        return Match(name, name, self.reference, "exact", (self.reference,))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(root=tmp_path, fsync=False)


def _runner(settings: Settings) -> tuple[JobRunner, Spool]:
    spool = Spool(settings)
    spool.create_folders()
    library = _Library(settings.root / "ref.nii.gz")
    retries = Retries(lambda job, _: None)
    return JobRunner(settings, spool, retries, resolve=library.resolve, metrics=Metrics()), spool


def _claimed(spool: Spool, path: Path, content: bytes) -> Claim:
    """`content` dropped at `path` in the inbox, then claimed."""
    path.write_bytes(content)
    claim = spool.claim(path)
    assert claim is not None
    return claim


def _never_called(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the input was to be rejected unread")


class TestJobRunner:
    def test_a_truncated_input_fails_as_truncated_unread(self, settings: Settings) -> None:
        """A truncated job's claim goes to failed with its record; nothing converts it."""
        runner, spool = _runner(settings)
        path = settings.inbox_dir / "a.npy"
        claim = _claimed(spool, path, b"\x93NUMPY")
        with capture_logs() as logs:
            runner.finish(Job(path, truncated=True), claim, _never_called)
        record = json.loads((settings.failed_dir / "a.npy.error.json").read_text())
        assert record["error"] == ErrorCode.TRUNCATED.value
        assert "incomplete and unchanged for 600 s" in record["message"]
        (line,) = [line for line in logs if line["event"] == "input_failed"]
        assert line["error"] == "truncated"
        assert runner.tally.failed == 1

    def test_a_rejection_by_the_converter_is_failed(self, settings: Settings) -> None:
        """A ConversionError out of the conversion moves the input to failed."""
        runner, spool = _runner(settings)
        path = settings.inbox_dir / "a.npy"
        claim = _claimed(spool, path, b"x")

        def reject(*args: Any, **kwargs: Any) -> Any:
            raise ConversionError(ErrorCode.CORRUPT, "a.npy: expected a .npy header")

        with capture_logs():
            runner.finish(Job.claimed(claim), claim, reject)
        record = json.loads((settings.failed_dir / "a.npy.error.json").read_text())
        assert record["error"] == "corrupt"

    def test_each_outcome_is_recorded_once(self, settings: Settings) -> None:
        """`record` (the status page's memory) gets each input's outcome, once."""
        runner, spool = _runner(settings)
        recorded: list[object] = []
        runner.record = recorded.append
        path = settings.inbox_dir / "a.npy"
        claim = _claimed(spool, path, b"\x93NUMPY")
        with capture_logs():
            runner.finish(Job(path, truncated=True), claim, _never_called)
        [outcome] = recorded
        assert isinstance(outcome, Failed)
        assert outcome.failed_as == settings.failed_dir / "a.npy"


class TestProfiles:
    def test_an_input_converts_with_its_profile(self, tmp_path: Path) -> None:
        """An input under a profile's glob is resolved by that profile's rules and
        converted with its settings, and `input_converted` names the profile; an
        input no profile fits converts with the top-level settings, profile null."""
        profile = {"name": "nnunet", "match": "nnunet/**", "axis_order": "zyx"}
        settings = load_settings(root=tmp_path, fsync=False, profiles=[profile])
        spool = Spool(settings)
        spool.create_folders()
        asked: list[tuple[str, str | None]] = []
        reference = tmp_path / "ref.nii.gz"

        def resolve(name: str, profile: str | None = None) -> Match:
            asked.append((name, profile))
            return Match(name, name, reference, "exact", (reference,))

        runner = JobRunner(
            settings, spool, Retries(lambda job, _: None), resolve=resolve, metrics=Metrics()
        )
        used: list[tuple[str, object]] = []

        def convert(source: Path, out_dir: Path, **options: Any) -> Any:
            used.append((options["settings"].axis_order, options["provenance"]["profile"]))
            raise ConversionError(ErrorCode.CORRUPT, "stop here: the settings are seen")

        (settings.inbox_dir / "nnunet").mkdir()
        with capture_logs():
            for relative in ("nnunet/a.npy", "b.npy"):
                claim = _claimed(spool, settings.inbox_dir / relative, b"x")
                runner.finish(Job.claimed(claim), claim, convert)
        assert asked == [("a.npy", "nnunet"), ("b.npy", None)]
        assert used == [("zyx", "nnunet"), ("xyz", None)]

    def test_a_claim_adopted_meanwhile_is_dropped_untouched(self, settings: Settings) -> None:
        """Paused past its lease, the instance finds its claim adopted by another
        (the claim folder renamed away): `claim_lost`, nothing moved or counted."""
        runner, spool = _runner(settings)
        path = settings.inbox_dir / "a.npy"
        claim = _claimed(spool, path, b"x")
        adopted = settings.root / "adopted"
        claim.folder.rename(adopted)
        with capture_logs() as logs:
            runner.finish(Job.claimed(claim), claim, _never_called)
        (line,) = [line for line in logs if line["event"] == "claim_lost"]
        assert (line["input"], line["instance"]) == ("a.npy", spool.instance)
        assert (adopted / "a.npy").read_bytes() == b"x"
        assert list(settings.archive_dir.iterdir()) == list(settings.failed_dir.iterdir()) == []
        assert (runner.tally.converted, runner.tally.failed) == (0, 0)
