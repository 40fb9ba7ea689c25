"""Tests of the settings model and its sources (README: Configuration)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from niftidrop.config_sources import flag
from niftidrop.errors import ConfigError
from niftidrop.profile_rules import PROFILE_KEYS
from niftidrop.resources import available_cpus, available_memory
from niftidrop.settings import (
    WORKER_FOOTPRINT_BYTES,
    Settings,
    find_config_file,
    load_settings,
    parse_address,
)
from real_command import niftidrop


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
            ("on_converted", "upload.sh"),
            ("on_converted", "[]"),
            ("on_failed", '[""]'),
            ("notify_url", "ftp://example.org/events"),
            ("notify_url", "http://"),
            ("hook_timeout", 0),
            ("hook_attempts", 0),
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


class TestHandOffSettings:
    def test_defaults(self) -> None:
        """No hook and no URL unless configured; 30 s and 5 tries (README: Hand-off)."""
        settings = Settings()
        assert settings.on_converted is None
        assert settings.on_failed is None
        assert settings.notify_url is None
        assert settings.hook_timeout == 30
        assert settings.hook_attempts == 5

    def test_a_command_from_each_source(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A command is a list of strings: a TOML array, or JSON in a flag or variable."""
        config = tmp_path / "n.toml"
        config.write_text('on_converted = ["/usr/local/bin/upload", "--site", "a b"]\n')
        assert load_settings(config).on_converted == ["/usr/local/bin/upload", "--site", "a b"]
        monkeypatch.setenv("NIFTIDROP_ON_FAILED", '["report", "$(x)"]')
        assert load_settings().on_failed == ["report", "$(x)"]
        assert load_settings(on_failed='["flag"]').on_failed == ["flag"]

    def test_an_empty_command_or_url_is_none(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An empty variable turns a hook or the URL off, as an unset one does."""
        monkeypatch.setenv("NIFTIDROP_ON_CONVERTED", "")
        monkeypatch.setenv("NIFTIDROP_NOTIFY_URL", "")
        settings = load_settings()
        assert settings.on_converted is None
        assert settings.notify_url is None

    def test_a_url_keeps_its_spelling(self) -> None:
        """http and https URLs with a host are accepted as given."""
        url = "https://pacs.example.org:8443/api/events?site=a"
        assert load_settings(notify_url=url).notify_url == url


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


class TestLabels:
    """`labels` (README: Conversion): read and checked when the settings are made."""

    def test_a_toml_table_with_string_keys(self, tmp_path: Path) -> None:
        """`labels = {1 = "liver", 2 = "tumour"}` in the file: value → name."""
        config = tmp_path / "n.toml"
        config.write_text('labels = {1 = "liver", 2 = "tumour"}\n')
        assert load_settings(config).labels == {1: "liver", 2: "tumour"}

    def test_a_dataset_json_from_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """NIFTIDROP_LABELS names an nnU-Net dataset.json: its labels, read once, value → name."""
        dataset = tmp_path / "dataset.json"
        dataset.write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
        monkeypatch.setenv("NIFTIDROP_LABELS", str(dataset))
        assert load_settings().labels == {0: "background", 1: "liver"}

    def test_a_json_table_from_a_flag(self) -> None:
        """`--labels '{"liver": 1}'`: names to values, as JSON."""
        assert load_settings(labels='{"liver": 1}').labels == {1: "liver"}

    def test_check_prints_the_table(self) -> None:
        """The settings as `check` prints them (JSON) carry the table read."""
        dumped = load_settings(labels='{"1": "liver"}').model_dump(mode="json")
        assert dumped["labels"] == {"1": "liver"}

    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            ("/nowhere/dataset.json", "/nowhere/dataset.json does not exist"),
            ('{"liver": 1', "not a JSON table"),
            ('{"one": "liver"}', "label value 'one' is not a whole number"),
        ],
    )
    def test_a_bad_value_is_a_configuration_error(self, value: str, reason: str) -> None:
        """A missing file, bad JSON or a key that is no number: a ConfigError in the words of
        every setting's errors (source, what is allowed, the value found), with the reason."""
        with pytest.raises(ConfigError) as raised:
            load_settings(labels=value)
        message = str(raised.value)
        assert message.startswith("flag --labels: expected a table of values and names")
        assert f"found {json.dumps(value)} ({reason}" in message

    def test_a_bad_dataset_json_in_the_file_names_the_key(self, tmp_path: Path) -> None:
        """From the TOML file: the file and key, then what was wrong with the dataset.json."""
        dataset = tmp_path / "dataset.json"
        dataset.write_text("{not json")
        config = tmp_path / "n.toml"
        config.write_text(f"labels = {json.dumps(str(dataset))}\n")
        with pytest.raises(ConfigError, match=rf"^{config}, key labels: expected .* is not JSON"):
            load_settings(config)


PROFILES_TOML = """
axis_order = "xyz"

[[profiles]]
name = "nnunet"
match = "nnunet/**"
axis_order = "zyx"
channels = "argmax"
library = ["refs/nnunet"]

[[profiles]]
name = "monai"
match = "monai/**"
"""


class TestProfiles:
    """`[[profiles]]` (README: Configuration, Profiles): read from every source, and
    each mistake in one refused in the words of any other configuration error."""

    def test_read_from_the_toml_file(self, tmp_path: Path) -> None:
        """The TOML file's array of tables gives the profiles, in order."""
        (tmp_path / "niftidrop.toml").write_text(PROFILES_TOML)
        settings = load_settings(tmp_path / "niftidrop.toml")
        assert [profile.name for profile in settings.profiles] == ["nnunet", "monai"]
        assert settings.profiles[0].settings() == {
            "axis_order": "zyx",
            "channels": "argmax",
            "library": [Path("refs/nnunet")],
        }
        assert settings.axis_order == "xyz"

    def test_read_from_the_environment_and_a_flag_as_json(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """NIFTIDROP_PROFILES and --profiles take the same tables as JSON; the flag wins."""
        monkeypatch.setenv("NIFTIDROP_PROFILES", json.dumps([{"name": "a", "match": "a/**"}]))
        assert load_settings().profiles[0].name == "a"
        flagged = load_settings(profiles=json.dumps([{"name": "b", "match": "**"}]))
        assert [profile.name for profile in flagged.profiles] == ["b"]

    @pytest.mark.parametrize(
        ("table", "problem"),
        [
            (
                'name = "a"\nmatch = "a/**"\ndtype = "int77"',
                "key profiles[0].dtype: expected auto, keep, or a numeric NumPy dtype name "
                '(uint8, float32...), found "int77" (not a NumPy dtype name)',
            ),
            (
                'name = "a"\nmatch = "a/**"\ncompression_level = 9',
                "key profiles[0].compression_level: expected a whole number from 0 to 3, found 9",
            ),
            (
                'name = "a"\nmatch = "a/**"\nchanels = "argmax"',
                "key profiles[0].chanels: unknown setting; did you mean `channels`?",
            ),
            (
                'name = "a"\nmatch = "a/**"\nworkers = 2',
                "key profiles[0].workers: unknown setting; expected one of: name, match, "
                + ", ".join(PROFILE_KEYS),
            ),
            ('match = "a/**"', "key profiles[0].name: missing; expected text"),
            ('name = "a"', "key profiles[0].match: missing; expected text"),
            (
                'name = "a"\nmatch = "/srv/inbox/a/**"',
                "key profiles[0].match: expected a glob on the path relative to the inbox "
                '(no leading /), found "/srv/inbox/a/**"',
            ),
        ],
    )
    def test_mistakes_name_the_file_the_profile_and_the_key(
        self, tmp_path: Path, table: str, problem: str
    ) -> None:
        """A bad value, an unknown key (with the closest name, or the keys allowed),
        a missing name or match and an absolute glob are configuration errors that
        name the file, the profile's place and key, the value and what is allowed."""
        toml = tmp_path / "niftidrop.toml"
        toml.write_text(f"[[profiles]]\n{table}\n")
        with pytest.raises(ConfigError) as raised:
            load_settings(toml)
        assert str(raised.value).startswith(f"{toml}, {problem}")

    def test_two_profiles_with_one_name(self, tmp_path: Path) -> None:
        """Two profiles of one name are refused, naming both places."""
        toml = tmp_path / "niftidrop.toml"
        toml.write_text(PROFILES_TOML.replace('"monai"', '"nnunet"'))
        with pytest.raises(ConfigError) as raised:
            load_settings(toml)
        assert str(raised.value) == (
            f"{toml}, key profiles: expected each profile name once, found 'nnunet' at "
            "profiles[0] and profiles[1]"
        )

    def test_settings_with_profiles_pickle(self) -> None:
        """Settings with profiles reach the conversion processes pickled, intact."""
        settings = load_settings(profiles=[{"name": "a", "match": "a/**", "dtype": "uint8"}])
        copied = pickle.loads(pickle.dumps(settings))
        assert copied == settings
        assert copied.profiles[0].settings() == {"dtype": "uint8"}

    def test_json_that_is_not_a_list(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Profiles in the environment that are not JSON tables name the variable."""
        monkeypatch.setenv("NIFTIDROP_PROFILES", '{"name": "a"')
        with pytest.raises(ConfigError, match="environment variable NIFTIDROP_PROFILES: "):
            load_settings()

    def test_a_profile_library_joins_the_folder_checks(self, tmp_path: Path) -> None:
        """A profile's library folders are indexed, and may not lie in the outbox."""
        settings = load_settings(
            root=tmp_path,
            profiles=[{"name": "a", "match": "**", "library": ["outbox/refs", "library"]}],
        )
        assert settings.all_library_dirs == [tmp_path / "library", tmp_path / "outbox" / "refs"]
        (problem,) = settings.folder_overlaps()
        assert f"library {str(tmp_path / 'outbox' / 'refs')!r} is inside outbox" in problem

    def test_check_prints_the_profiles_and_refuses_mistakes(self, tmp_path: Path) -> None:
        """The real `niftidrop check` prints each profile with its effective values,
        and exits 2 naming a mistake in one."""
        toml = tmp_path / "niftidrop.toml"
        toml.write_text(f'root = "{tmp_path}"\nnpz_key = "probabilities"\n{PROFILES_TOML}')
        done = niftidrop("check", "--config", str(toml))
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout)["profiles"]
        assert [entry["name"] for entry in printed] == ["nnunet", "monai"]
        assert printed[0]["axis_order"] == "zyx"
        assert printed[0]["npz_key"] == "probabilities"  # the top level's, in effect
        assert printed[1]["axis_order"] == "xyz"
        assert "library: " + str(tmp_path / "refs" / "nnunet") in done.stderr  # run makes it
        toml.write_text(PROFILES_TOML + 'on_conflict = "skip"\n')
        done = niftidrop("check", "--config", str(toml))
        assert done.returncode == 2
        assert f"{toml}, key profiles[1].on_conflict: expected one of: overwrite, rename, fail" in (
            done.stderr
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
