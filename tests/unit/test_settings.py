"""Tests of the settings model and its sources (README: Configuration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from niftidrop.config_sources import flag
from niftidrop.errors import ConfigError
from niftidrop.resources import available_cpus, available_memory
from niftidrop.settings import (
    WORKER_FOOTPRINT_BYTES,
    Settings,
    find_config_file,
    load_settings,
    parse_address,
)


class TestDefaults:
    def test_folders_default_under_root(self, tmp_path: Path) -> None:
        """Relative folders resolve against root; state lives in the inbox."""
        settings = load_settings(root=tmp_path)
        assert settings.inbox_dir == tmp_path / "inbox"
        assert settings.library_dirs == [tmp_path / "library"]
        assert settings.state_path == tmp_path / "inbox" / ".niftidrop"

    def test_every_folder_resolves_against_root_and_is_no_field(self, tmp_path: Path) -> None:
        """inbox_dir, outbox_dir, archive_dir and failed_dir are their settings made
        absolute; they are not settings themselves (not dumped, not flags)."""
        settings = load_settings(root=tmp_path, archive="/srv/archive")
        assert settings.outbox_dir == tmp_path / "outbox"
        assert settings.archive_dir == Path("/srv/archive")
        assert settings.failed_dir == tmp_path / "failed"
        dumped = settings.model_dump()
        assert not [name for name in dumped if name.endswith("_dir") and name != "state_dir"]

    def test_contract_defaults(self) -> None:
        """The defaults are the ones the README (Configuration) promises."""
        settings = Settings()
        assert settings.settle_seconds == 1.0
        assert settings.incomplete_timeout == 600
        assert settings.rescan_interval == 30
        assert settings.separators == "_-."
        assert settings.dtype == "auto"
        assert settings.compression_level == 1
        assert settings.max_input_bytes == 16 * 1024**3
        assert settings.shutdown_timeout == 30
        assert settings.heartbeat_interval == 5
        assert settings.metrics_address is None
        assert settings.workers >= 1


# Restricts its own affinity to the CPUs given, then loads the settings.
_CHILD = """
import json, os, sys
os.sched_setaffinity(0, {int(cpu) for cpu in sys.argv[1:]})
from niftidrop.settings import load_settings
settings = load_settings()
print(json.dumps({"workers": settings.workers, "threads": settings.threads,
                  "service": settings.for_service().compression_threads}))
"""


def _defaults_in_child(cpus: set[int]) -> dict[str, int]:
    """workers, threads and the service's compression_threads of a child process
    restricted to `cpus` (no NIFTIDROP_* variables, no TOML file)."""
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, sorted(cpus))],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    defaults: dict[str, int] = json.loads(run.stdout)
    return defaults


class TestCpuDefaults:
    def test_the_defaults_follow_the_cpus_this_process_may_use(self) -> None:
        """workers, threads and for_service's compression_threads default to
        available_cpus() (affinity and cgroup quota), not os.cpu_count()."""
        settings = load_settings()
        cpus = available_cpus()
        assert settings.workers == min(cpus, available_memory() // WORKER_FOOTPRINT_BYTES)
        assert settings.threads == cpus
        assert settings.for_service().compression_threads == max(1, cpus // settings.workers)

    def test_a_child_restricted_to_one_cpu_gets_one_of_each(self) -> None:
        """A real process whose affinity is one CPU defaults to 1 worker and 1
        compression thread, as a container limited to one CPU would."""
        first = min(os.sched_getaffinity(0))
        assert _defaults_in_child({first}) == {"workers": 1, "threads": 1, "service": 1}

    def test_a_child_restricted_to_two_cpus_gets_two_workers(self) -> None:
        """With two CPUs allowed: 2 workers, 2 threads for one conversion, and the
        service's workers share them (1 thread each)."""
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2 or available_cpus() < 2:
            pytest.skip("this machine lets the tests use one CPU only")
        assert _defaults_in_child(set(allowed[:2])) == {"workers": 2, "threads": 2, "service": 1}

    def test_check_prints_the_defaults_of_a_restricted_process(self, tmp_path: Path) -> None:
        """`niftidrop check` in a process restricted to one CPU prints workers 1 and
        compression_threads 1 (the settings `run` would use)."""
        first = min(os.sched_getaffinity(0))
        (tmp_path / "library").mkdir()
        run = subprocess.run(
            [sys.executable, "-m", "niftidrop", "check", "--root", str(tmp_path)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=lambda: os.sched_setaffinity(0, {first}),
        )
        printed = json.loads(run.stdout)
        assert (printed["workers"], printed["compression_threads"]) == (1, 1), run.stderr


class TestSources:
    def test_precedence(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Flags beat the environment, which beats the TOML file, which beats defaults."""
        config = tmp_path / "n.toml"
        config.write_text('workers = 3\nsettle_seconds = 2.5\ndtype = "float32"\n')
        monkeypatch.setenv("NIFTIDROP_WORKERS", "5")
        monkeypatch.setenv("NIFTIDROP_DTYPE", "uint8")
        settings = load_settings(config, dtype="int16")
        assert settings.workers == 5
        assert settings.settle_seconds == 2.5
        assert settings.dtype == "int16"

    def test_config_search_order(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """NIFTIDROP_CONFIG is used, then ./niftidrop.toml."""
        Path("niftidrop.toml").write_text("workers = 4\n")
        assert load_settings().workers == 4
        other = tmp_path / "other.toml"
        other.write_text("workers = 6\n")
        monkeypatch.setenv("NIFTIDROP_CONFIG", str(other))
        assert find_config_file() == other
        assert load_settings().workers == 6

    def test_missing_config_file_is_an_error(self, tmp_path: Path) -> None:
        """A named config file that does not exist stops the start."""
        with pytest.raises(ConfigError, match="does not exist"):
            load_settings(tmp_path / "absent.toml")

    def test_library_from_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The library list reads as JSON or as os.pathsep-separated paths."""
        monkeypatch.setenv("NIFTIDROP_LIBRARY", "a:b")
        assert load_settings().library == [Path("a"), Path("b")]
        monkeypatch.setenv("NIFTIDROP_LIBRARY", '["c"]')
        assert load_settings().library == [Path("c")]


class TestValidation:
    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("dtype", "object"),
            ("dtype", "nonsense"),
            ("key_pattern", "(?P<nokey>.*)"),
            ("key_pattern", "("),
            ("metrics_address", "9464"),
            ("workers", 0),
            ("compression_level", 9),
            ("observer", "fsevents"),
            ("default_affine", "[[1, 0], [0, 1]]"),
        ],
    )
    def test_invalid_value_names_the_setting(self, name: str, value: object) -> None:
        """Every invalid value is a ConfigError whose message names the setting by its
        source (here the flag) and says what is expected."""
        with pytest.raises(ConfigError, match=f"^flag {flag(name)}: expected "):
            load_settings(**{name: value})

    def test_dtype_is_normalised(self) -> None:
        """Dtype names are stored in NumPy's spelling."""
        assert load_settings(dtype="f4").dtype == "float32"

    def test_more_workers_than_the_memory_holds_are_refused(self) -> None:
        """`workers` beyond what the memory holds (a conversion process each) is a
        ConfigError that says the bound and why; the bound itself is accepted."""
        most = available_memory() // WORKER_FOOTPRINT_BYTES
        assert load_settings(workers=most).workers == most
        expected = rf"^flag --workers: expected at most {most} \(each worker .*found {most + 1}"
        with pytest.raises(ConfigError, match=expected):
            load_settings(workers=most + 1)


class TestParseAddress:
    def test_ipv4(self) -> None:
        """host:port splits into host and integer port."""
        assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)

    def test_ipv6_in_brackets(self) -> None:
        """An IPv6 host loses its brackets."""
        assert parse_address("[::1]:9464") == ("::1", 9464)

    @pytest.mark.parametrize("address", ["9464", ":9464", "localhost:", "host:http", "h:70000"])
    def test_rejects_malformed(self, address: str) -> None:
        """Anything but host:port with a port number is refused, quoting the address."""
        with pytest.raises(ValueError, match="expected host:port"):
            parse_address(address)

    def test_the_setting_needs_a_port_of_its_own(self) -> None:
        """`metrics_address` refuses port 0 (a free port nobody would know to scrape)."""
        with pytest.raises(ConfigError, match=r"^flag --metrics-address: .* from 1 to 65535"):
            load_settings(metrics_address="127.0.0.1:0")


class TestForService:
    def test_zero_compression_threads_share_the_cpus_among_workers(self) -> None:
        """compression_threads 0 becomes the CPUs per worker, at least 1; the rest stays."""
        settings = load_settings(workers=1, compression_threads=0)
        resolved = settings.for_service()
        assert resolved.compression_threads == available_cpus()
        assert resolved.model_dump(exclude={"compression_threads"}) == settings.model_dump(
            exclude={"compression_threads"}
        )
        many = Settings.model_construct(**{**settings.model_dump(), "workers": 10_000})
        assert many.for_service().compression_threads == 1

    def test_a_given_number_is_kept(self) -> None:
        """A non-zero compression_threads is used as it is."""
        settings = load_settings(compression_threads=2)
        assert settings.for_service() is settings


class TestFolderOverlaps:
    @pytest.mark.parametrize(
        ("values", "named"),
        [
            ({"archive": "inbox/archive"}, ("archive", "inbox")),
            ({"failed": "inbox/failed"}, ("failed", "inbox")),
            ({"outbox": "inbox/sub/outbox"}, ("outbox", "inbox")),
            ({"state_dir": "inbox/state"}, ("state_dir", "inbox")),
            ({"library": ["shared"], "outbox": "shared/out"}, ("outbox", "library")),
            ({"library": ["outbox/refs"]}, ("library", "outbox")),
            ({"library": ["refs", "inbox/refs"]}, ("library", "inbox")),
            ({"inbox": "archive/in"}, ("inbox", "archive")),
            ({"outbox": "failed"}, ("outbox", "failed")),
            ({"archive": "inbox/.niftidrop/archive"}, ("archive", "state_dir")),
            ({"state_dir": "archive/state"}, ("state_dir", "archive")),
            ({"outbox": "archive/.outputs"}, ()),
        ],
    )
    def test_overlaps_are_named(
        self, tmp_path: Path, values: dict[str, object], named: tuple[str, ...]
    ) -> None:
        """A folder inside another where niftidrop would feed on its own files is
        refused, naming both settings and both paths; hidden folders are fine."""
        settings = load_settings(root=tmp_path, **values)
        problems = settings.folder_overlaps()
        if not named:
            assert problems == []
            settings.check_folders()
            return
        assert len(problems) == 1, problems
        paths = {
            "inbox": settings.inbox_dir,
            "outbox": settings.outbox_dir,
            "archive": settings.archive_dir,
            "failed": settings.failed_dir,
            "state_dir": settings.state_path,
            "library": settings.library_dirs[-1],
        }
        for setting in named:
            assert f"{setting} {str(paths[setting])!r}" in problems[0]
        with pytest.raises(ConfigError, match="overlapping folders"):
            settings.check_folders()

    @pytest.mark.parametrize(
        "values",
        [
            {},
            {"state_dir": "inbox/.state"},
            {"archive": "inbox/.done", "failed": "inbox/.failed", "outbox": "inbox/.out"},
            {"library": ["inbox/.refs", "refs", "refs/sub"]},
            {"recursive": False, "archive": "inbox/archive", "state_dir": "inbox/state"},
            {"inbox": "outbox/.inbox"},
        ],
    )
    def test_safe_layouts_are_accepted(self, tmp_path: Path, values: dict[str, object]) -> None:
        """The hidden default state folder, hidden folders inside the inbox, overlapping
        library folders, and subfolders of a non-recursive inbox are all fine."""
        assert load_settings(root=tmp_path, **values).folder_overlaps() == []

    def test_symlinks_are_resolved(self, tmp_path: Path) -> None:
        """An archive that is a symlink into the inbox is inside the inbox."""
        (tmp_path / "inbox" / "done").mkdir(parents=True)
        (tmp_path / "archive").symlink_to(tmp_path / "inbox" / "done")
        (problem,) = load_settings(root=tmp_path).folder_overlaps()
        assert problem.startswith(f"archive '{tmp_path / 'archive'}' (really ")
        assert f"inside inbox '{tmp_path / 'inbox'}'" in problem

    def test_same_folder(self, tmp_path: Path) -> None:
        """Two settings naming one folder are refused."""
        (problem,) = load_settings(root=tmp_path, archive="failed").folder_overlaps()
        assert problem == (
            f"archive {str(tmp_path / 'failed')!r} and failed {str(tmp_path / 'failed')!r} "
            "are the same folder: each needs a folder of its own"
        )


# Blocks Pillow (as if the extra were not installed), then runs the command line.
_WITHOUT_PILLOW = (
    "import sys; sys.modules['PIL'] = None; from niftidrop.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)


class TestPreviewSetting:
    def test_off_by_default_and_on_with_pillow(self) -> None:
        """preview is false by default; true is accepted where Pillow is installed."""
        assert Settings.from_values().preview is False
        assert Settings.from_values(preview=True).preview is True

    @pytest.mark.parametrize("command", [["check"], ["run", "--once"]])
    def test_without_pillow_the_start_fails_with_how_to_install_it(
        self, tmp_path: Path, command: list[str]
    ) -> None:
        """preview = true without Pillow: a configuration error at start (exit 2) naming
        the setting and the extra to install, before any input is looked at."""
        config = tmp_path / "niftidrop.toml"
        config.write_text(f'root = "{tmp_path}"\npreview = true\n')
        for folder in ("inbox", "library"):
            (tmp_path / folder).mkdir()
        done = subprocess.run(
            [sys.executable, "-c", _WITHOUT_PILLOW, *command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "preview" in done.stderr
        assert "niftidrop[preview]" in done.stderr
        assert not (tmp_path / "outbox").exists()

    def test_without_pillow_preview_off_still_starts(self, tmp_path: Path) -> None:
        """Pillow is needed only when previews are on."""
        for folder in ("inbox", "library"):
            (tmp_path / folder).mkdir()
        done = subprocess.run(
            [sys.executable, "-c", _WITHOUT_PILLOW, "check", "--root", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
