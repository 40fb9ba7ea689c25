"""Tests of the service commands: run --once, check, status, health, retry."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import structlog

from niftidrop.cli import ExitCode, main
from real_command import niftidrop
from spools import instance_folder


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "library").mkdir()
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    nib.save(image, tmp_path / "library" / "case1.nii.gz")
    (tmp_path / "inbox").mkdir()
    return tmp_path


def flags(root: Path) -> list[str]:
    return ["--root", str(root), "--log-format", "json", "--no-fsync"]


def drop(root: Path, name: str, shape: tuple[int, ...] = (4, 5, 6)) -> Path:
    path = root / "inbox" / name
    np.save(path, np.ones(shape, np.uint8))
    return path


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


class TestRunOnce:
    def test_converts_the_inbox_and_exits_0(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """run --once converts every input present, logs JSON, and exits 0."""
        drop(root, "case1.npy")
        assert main(["run", "--once", *flags(root)]) == ExitCode.OK
        assert (root / "outbox" / "case1.nii.gz").is_file()
        assert (root / "archive" / "case1.npy").is_file()
        events = [line["event"] for line in json_lines(capsys.readouterr().out)]
        assert events.count("input_converted") == 1
        assert events[-1] == "service_stopped"

    def test_a_rejection_exits_1(self, root: Path) -> None:
        """run --once exits 1 when an input fails (here: shape mismatch)."""
        drop(root, "case1.npy", shape=(3, 3, 3))
        assert main(["run", "--once", *flags(root)]) == ExitCode.FAILED
        assert (root / "failed" / "case1.npy.error.json").is_file()

    def test_missing_folders_are_created_and_empty_library_warned(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """run creates missing folders and warns when the library is empty."""
        assert main(["run", "--once", *flags(tmp_path)]) == ExitCode.OK
        for name in ("inbox", "outbox", "archive", "failed", "library"):
            assert (tmp_path / name).is_dir()
        events = json_lines(capsys.readouterr().out)
        assert any(line["event"] == "library_empty" for line in events)

    def test_unusable_library_is_reported_not_fatal(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A library path that cannot be made a folder is logged; the run goes on."""
        (tmp_path / "library").write_text("not a folder")
        assert main(["run", "--once", *flags(tmp_path)]) == ExitCode.OK
        events = [line["event"] for line in json_lines(capsys.readouterr().out)]
        assert "library_unavailable" in events
        assert events[-1] == "service_stopped"

    def test_bad_config_exits_2(self, root: Path) -> None:
        """An invalid setting stops the start with exit code 2."""
        assert main(["run", "--once", *flags(root), "--workers", "0"]) == ExitCode.BAD_CONFIG

    def test_conversion_processes_that_cannot_start_exit_3(
        self, root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No conversion process (here: a program that exits at once): service_failed
        and exit 3 (the service could not start), said why."""
        monkeypatch.setattr(sys, "executable", "/bin/false")
        assert main(["run", "--once", *flags(root)]) == ExitCode.SERVICE_FAILED
        out, err = capsys.readouterr()
        assert "conversion process did not start" in err
        assert json_lines(out)[-1]["event"] == "service_failed"

    def test_a_folder_that_cannot_be_made_is_logged_and_exits_3(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An OSError at start (an outbox under a file): a service_failed JSON line with
        the error, a one-line message, no traceback, exit 3."""
        (root / "blocker").write_text("a file, not a folder")
        code = main(["run", "--once", *flags(root), "--outbox", str(root / "blocker" / "out")])
        assert code == ExitCode.SERVICE_FAILED
        out, err = capsys.readouterr()
        (failed,) = [line for line in json_lines(out) if line["event"] == "service_failed"]
        assert "blocker" in str(failed["error"])
        assert "Traceback" not in err
        assert "blocker" in err

    def test_a_crashing_conversion_fails_after_max_attempts_and_exits_1(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A real MemoryError in the conversion process (an .npz read whole, for a
        preview, that decompresses beyond `max_memory`): tried exactly `max_attempts`
        times, then failed as conversion_crashed with its `.error.json`, and run
        --once exits 1."""
        np.savez_compressed(
            root / "inbox" / "huge.npz", prediction=np.zeros((512, 512, 1024), np.uint8)
        )
        args = ["run", "--once", *flags(root), "--max-memory", str(250 * 1024**2), "--preview"]
        code = main([*args, "--max-attempts", "2", "--missing-reference", "identity"])
        assert code == ExitCode.FAILED
        record = json.loads((root / "failed" / "huge.npz.error.json").read_text())
        assert record["error"] == "conversion_crashed"
        assert "MemoryError" in record["message"]
        assert "each of 2 attempts" in record["message"]
        events = json_lines(capsys.readouterr().out)
        assert [line["attempt"] for line in events if line["event"] == "input_retrying"] == [1]
        assert [line["event"] for line in events].count("conversion_exception") == 2
        assert events[-1]["event"] == "service_stopped"
        assert events[-1]["failed"] == 1

    def test_state_on_another_file_system_exits_2(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A state folder that cannot receive inputs by rename is refused (exit 2)."""
        shm = Path("/dev/shm")
        if not shm.is_dir() or shm.stat().st_dev == root.stat().st_dev:
            pytest.skip("needs /dev/shm on another file system")
        state = shm / f"niftidrop-test-{os.getpid()}"
        try:
            code = main(["run", "--once", *flags(root), "--state-dir", str(state)])
        finally:
            for path in sorted(state.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            state.rmdir()
        assert code == ExitCode.BAD_CONFIG
        assert "file system" in capsys.readouterr().err


class TestOverlappingFolders:
    @pytest.mark.parametrize(
        ("option", "value", "inside"),
        [
            ("--archive", "inbox/archive", "inbox"),
            ("--failed", "inbox/failed", "inbox"),
            ("--state-dir", "inbox/state", "inbox"),
            ("--outbox", "library/out", "library"),
        ],
    )
    def test_run_refuses_them_with_exit_2(
        self,
        root: Path,
        capsys: pytest.CaptureFixture[str],
        option: str,
        value: str,
        inside: str,
    ) -> None:
        """A folder inside the inbox or the library is refused before anything is
        created or converted, naming both settings and both paths."""
        drop(root, "case1.npy")
        code = main(["run", "--once", *flags(root), option, value])
        assert code == ExitCode.BAD_CONFIG
        err = capsys.readouterr().err
        setting = option.removeprefix("--").replace("-", "_")
        assert f"{setting} {str(root / value)!r} is inside {inside} {str(root / inside)!r}" in err
        assert not (root / value).exists()
        assert (root / "inbox" / "case1.npy").is_file()

    def test_check_reports_them(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`niftidrop check` reports the same overlap and exits 2."""
        assert main(["check", *flags(root), "--archive", "inbox/archive"]) == ExitCode.BAD_CONFIG
        assert "archive" in capsys.readouterr().err

    def test_hidden_state_folder_in_the_inbox_is_fine(self, root: Path) -> None:
        """The default state folder, hidden inside the inbox, is accepted."""
        drop(root, "case1.npy")
        assert main(["run", "--once", *flags(root)]) == ExitCode.OK
        assert main(["check", *flags(root)]) == ExitCode.OK


class TestCheck:
    @pytest.mark.parametrize("threads", ["0", "3"])
    def test_prints_the_settings_run_uses(
        self, root: Path, capsys: pytest.CaptureFixture[str], threads: str
    ) -> None:
        """`check` prints compression_threads as the service resolves it (0: the CPUs
        shared among the workers), not as configured."""
        from niftidrop.resources import available_cpus
        from niftidrop.service import Service
        from niftidrop.settings import load_settings

        options = [*flags(root), "--workers", "1", "--compression-threads", threads]
        assert main(["check", *options]) == ExitCode.OK
        printed = json.loads(capsys.readouterr().out)
        settings = load_settings(root=root, workers=1, compression_threads=int(threads))
        used = Service(settings).settings
        assert printed["compression_threads"] == used.compression_threads
        assert printed["compression_threads"] == (int(threads) or available_cpus())


class TestCheckFolders:
    SPOOL = ("inbox", "outbox", "archive", "failed", "library")

    def test_an_empty_folder_is_what_run_will_create(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """In an empty folder check exits 0 and names each missing folder as one run
        will create, creating none; after run, check has nothing to say."""
        assert main(["check", *flags(tmp_path)]) == ExitCode.OK
        out, err = capsys.readouterr()
        assert json.loads(out)["root"] == str(tmp_path)
        for name in self.SPOOL:
            assert f"{name}: {tmp_path / name} does not exist yet; run will create it" in err
            assert not (tmp_path / name).exists()
        assert f"state_dir: {tmp_path / 'inbox' / '.niftidrop'} does not exist yet" in err
        assert "error" not in err
        assert main(["run", "--once", *flags(tmp_path)]) == ExitCode.OK
        capsys.readouterr()
        assert main(["check", *flags(tmp_path)]) == ExitCode.OK
        assert capsys.readouterr().err == ""

    def test_the_real_command_in_an_empty_folder(self, tmp_path: Path) -> None:
        """`niftidrop check` run in an empty working folder: exit 0, the settings on
        stdout, what run will create on stderr."""
        result = niftidrop("check", cwd=tmp_path)
        assert result.returncode == ExitCode.OK, result.stderr
        assert json.loads(result.stdout)["inbox"] == "inbox"
        assert f"inbox: {tmp_path / 'inbox'} does not exist yet; run will create it" in (
            result.stderr
        )
        assert not any((tmp_path / name).exists() for name in self.SPOOL)

    def test_a_spool_folder_that_is_a_file_is_an_error(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file where a spool folder goes stops run, so check exits 2 naming it."""
        (root / "outbox").write_text("a file")
        assert main(["check", *flags(root)]) == ExitCode.BAD_CONFIG
        outbox = root / "outbox"
        assert f"error: outbox: {outbox} exists and is not a folder" in capsys.readouterr().err
        assert main(["run", "--once", *flags(root)]) == ExitCode.BAD_CONFIG

    def test_a_spool_folder_that_cannot_be_made_is_an_error(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A folder under a file cannot be made: check exits 2 and says why."""
        (root / "blocker").write_text("a file")
        archive = root / "blocker" / "archive"
        assert main(["check", *flags(root), "--archive", str(archive)]) == ExitCode.BAD_CONFIG
        err = capsys.readouterr().err
        assert f"error: archive: {archive} cannot be created: {root / 'blocker'} is not" in err

    def test_an_unusable_library_is_a_warning(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A library that is a file, or cannot be made, is what run only warns about
        (library_unavailable): check says so and exits 0."""
        (tmp_path / "library").write_text("a file")
        (tmp_path / "blocker").write_text("a file")
        extra = tmp_path / "blocker" / "scans"
        options = [*flags(tmp_path), "--library", "library", "--library", str(extra)]
        assert main(["check", *options]) == ExitCode.OK
        err = capsys.readouterr().err
        assert f"warning: library: {tmp_path / 'library'} exists and is not a folder" in err
        assert f"warning: library: {extra} does not exist and cannot be created" in err
        assert "library_unavailable" in err

    def test_a_state_folder_on_another_file_system_is_an_error(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """check refuses, as run does, a state folder that cannot receive inputs by
        rename, before either exists."""
        shm = Path("/dev/shm")
        if not shm.is_dir() or shm.stat().st_dev == root.stat().st_dev:
            pytest.skip("needs /dev/shm on another file system")
        state = shm / f"niftidrop-test-{os.getpid()}" / "state"
        assert main(["check", *flags(root), "--state-dir", str(state)]) == ExitCode.BAD_CONFIG
        assert f"error: state_dir: {state} is on another file system" in capsys.readouterr().err
        assert not state.parent.exists()


class TestStatusAndHealth:
    def test_status_of_a_spool_that_does_not_exist_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """status on a root without an inbox says there is no spool there and exits 2,
        printing no counts and creating nothing."""
        nowhere = tmp_path / "nowhere"
        for extra in ([], ["--json"]):
            assert main(["status", *extra, *flags(nowhere)]) == ExitCode.BAD_CONFIG
            out, err = capsys.readouterr()
            assert out == ""
            assert f"no spool at {nowhere}: the inbox {nowhere / 'inbox'} does not exist" in err
        assert not nowhere.exists()

    def test_the_real_status_of_a_spool_that_does_not_exist(self, tmp_path: Path) -> None:
        """`niftidrop status --root /nowhere`: exit 2 and the reason on stderr."""
        result = niftidrop("status", "--root", str(tmp_path / "nowhere"))
        assert result.returncode == ExitCode.BAD_CONFIG
        assert result.stdout == ""
        assert f"no spool at {tmp_path / 'nowhere'}" in result.stderr

    def test_health_without_a_heartbeat_names_where_it_looked(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """health on a spool without a heartbeat exits 1, naming the heartbeat file."""
        assert main(["health", *flags(tmp_path)]) == ExitCode.FAILED
        heartbeat = instance_folder(tmp_path) / "heartbeat.json"
        assert f"unhealthy: no heartbeat at {heartbeat}" in capsys.readouterr().out

    def test_status_counts_each_folder(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """status --json reports counts per folder and the heartbeat age."""
        drop(root, "case1.npy")
        main(["run", "--once", *flags(root)])
        drop(root, "case1_b.npy")
        capsys.readouterr()
        assert main(["status", "--json", *flags(root)]) == ExitCode.OK
        report = json.loads(capsys.readouterr().out)
        assert report["inbox"] == 1
        assert report["outbox"] == 1
        assert report["archive"] == 1
        assert report["failed"] == 0
        assert report["claimed"] == 0
        assert isinstance(report["heartbeat_age"], float)

    def test_status_text(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Plain status prints one line per folder, and says when there is no heartbeat."""
        assert main(["status", *flags(root)]) == ExitCode.OK
        out = capsys.readouterr().out
        assert "inbox" in out
        assert "heartbeat none" in out

    def test_health_follows_the_heartbeat(self, root: Path) -> None:
        """health is 0 with a fresh heartbeat, 1 with a stale or missing one."""
        args = ["health", *flags(root), "--heartbeat-interval", "5"]
        assert main(args) == ExitCode.FAILED
        heartbeat = instance_folder(root) / "heartbeat.json"
        heartbeat.parent.mkdir(parents=True)
        heartbeat.write_text("{}")
        assert main(args) == ExitCode.OK
        old = time.time() - 16
        os.utime(heartbeat, (old, old))
        assert main(args) == ExitCode.FAILED

    def test_health_is_1_once_the_service_stopped(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """After run --once the heartbeat is fresh but says the service stopped:
        health exits 1, and status says stopped."""
        assert main(["run", "--once", *flags(root)]) == ExitCode.OK
        capsys.readouterr()
        assert main(["health", *flags(root), "--heartbeat-interval", "60"]) == ExitCode.FAILED
        assert "stopped" in capsys.readouterr().out
        assert main(["status", "--json", *flags(root)]) == ExitCode.OK
        assert json.loads(capsys.readouterr().out)["state"] == "stopped"


class TestRetry:
    def test_retry_puts_failed_inputs_back(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """retry NAME moves that failed input back to the inbox and drops its .error.json."""
        drop(root, "orphan.npy")
        drop(root, "lonely.npy")
        main(["run", "--once", *flags(root)])
        assert main(["retry", *flags(root), "orphan.npy"]) == ExitCode.OK
        assert (root / "inbox" / "orphan.npy").is_file()
        assert not (root / "failed" / "orphan.npy.error.json").exists()
        assert (root / "failed" / "lonely.npy").is_file()
        assert main(["retry", *flags(root)]) == ExitCode.OK
        assert (root / "inbox" / "lonely.npy").is_file()
        assert "1 input(s) moved back" in capsys.readouterr().out

    def test_a_name_not_in_failed_exits_1_naming_it(
        self, root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """retry with names not in failed moves the others and exits 1, naming each
        missing one."""
        drop(root, "orphan.npy")
        main(["run", "--once", *flags(root)])
        capsys.readouterr()
        code = main(["retry", *flags(root), "nothere.npy", "orphan.npy", "site/gone.npz"])
        assert code == ExitCode.FAILED
        out, err = capsys.readouterr()
        assert (root / "inbox" / "orphan.npy").is_file()
        assert "1 input(s) moved back" in out
        failed = root / "failed"
        assert f"error: not in failed ({failed}): nothere.npy" in err
        assert f"error: not in failed ({failed}): site/gone.npz" in err
        assert "orphan.npy" not in err

    def test_the_real_command_names_what_is_not_in_failed(self, root: Path) -> None:
        """`niftidrop retry nothere.npy` with nothing failed: exit 1, named on stderr."""
        assert main(["run", "--once", *flags(root)]) == ExitCode.OK
        result = niftidrop("retry", "--root", str(root), "nothere.npy")
        assert result.returncode == ExitCode.FAILED
        assert "0 input(s) moved back" in result.stdout
        assert "not in failed" in result.stderr
        assert "nothere.npy" in result.stderr

    def test_a_path_to_the_failed_file_names_it(
        self, root: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A NAME may be the failed file's path, absolute or relative (as a shell
        completes it)."""
        drop(root, "orphan.npy")
        drop(root, "lonely.npy")
        main(["run", "--once", *flags(root)])
        absolute = str(root / "failed" / "orphan.npy")
        assert main(["retry", *flags(root), absolute]) == ExitCode.OK
        monkeypatch.chdir(root)
        assert main(["retry", *flags(root), "failed/lonely.npy"]) == ExitCode.OK
        assert {path.name for path in (root / "inbox").glob("*.npy")} == {
            "orphan.npy",
            "lonely.npy",
        }

    def test_retry_without_a_spool_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """retry on a root without an inbox exits 2 and creates nothing."""
        nowhere = tmp_path / "nowhere"
        assert main(["retry", *flags(nowhere), "case.npy"]) == ExitCode.BAD_CONFIG
        assert "no spool at" in capsys.readouterr().err
        assert not nowhere.exists()
