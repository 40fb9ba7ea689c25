"""Tests of niftidrop.config_sources: where a bad setting came from, in the user's words
(README: Configuration), through `load_settings` and the real `niftidrop check`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from niftidrop.config_sources import (
    ENV_PREFIX,
    HOOK_VARIABLES,
    Sources,
    allowed,
    find_config_file,
    read_toml,
)
from niftidrop.errors import ConfigError
from niftidrop.settings import ALLOWED, Settings, load_settings

Source = Literal["flag", "env", "toml"]
SOURCES: tuple[Source, ...] = ("flag", "env", "toml")
# One invalid value of each kind: (kind, setting, value, what the message says is allowed).
INVALID: list[tuple[str, str, object, str]] = [
    ("type", "workers", "abc", "a whole number, at least 1"),
    ("range", "compression_level", 9, "a whole number from 0 to 3"),
    ("choice", "observer", "fsevents", "one of: auto, inotify, polling"),
]
NIFTIDROP = Path(sys.executable).with_name("niftidrop")


def _where(source: Source, name: str, toml: Path) -> str:
    """How a message names the place a setting was given."""
    if source == "flag":
        return "flag --" + name.replace("_", "-")
    if source == "env":
        return "environment variable NIFTIDROP_" + name.upper()
    return f"{toml}, key {name}"


def _found(source: Source, value: object) -> str:
    """The value as the message quotes it: flags and variables are always text."""
    return json.dumps(value if source == "toml" else str(value))


def _load(
    source: Source, values: dict[str, object], toml: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The ConfigError message of loading `values` given through `source`."""
    flags: dict[str, object] = {}
    if source == "flag":
        flags = {name: str(value) for name, value in values.items()}
    elif source == "env":
        for name, value in values.items():
            monkeypatch.setenv("NIFTIDROP_" + name.upper(), str(value))
    else:
        toml.write_text("".join(f"{name} = {json.dumps(v)}\n" for name, v in values.items()))
    with pytest.raises(ConfigError) as raised:
        load_settings(toml if source == "toml" else None, **flags)
    return str(raised.value)


class TestThroughLoadSettings:
    @pytest.mark.parametrize("source", SOURCES)
    @pytest.mark.parametrize("case", INVALID, ids=[kind for kind, *_ in INVALID])
    def test_each_invalid_value_says_where_what_and_what_is_allowed(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        source: Source,
        case: tuple[str, str, object, str],
    ) -> None:
        """A value of the wrong type, out of range or not among the choices names its
        source (flag, variable, or TOML file and key), what is allowed, and the value."""
        _, name, value, expected = case
        toml = tmp_path / "niftidrop.toml"
        message = _load(source, {name: value}, toml, monkeypatch)
        where = _where(source, name, toml)
        assert message == f"{where}: expected {expected}, found {_found(source, value)}"

    @pytest.mark.parametrize("source", SOURCES)
    def test_an_unknown_name_suggests_the_closest_setting(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: Source
    ) -> None:
        """`workres` (a flag from Python, a variable, a TOML key) is an unknown setting
        and the message asks "did you mean `workers`?" in that source's spelling."""
        toml = tmp_path / "niftidrop.toml"
        message = _load(source, {"workres": 4}, toml, monkeypatch)
        suggested = "NIFTIDROP_WORKERS" if source == "env" else "workers"
        assert message == (
            f"{_where(source, 'workres', toml)}: unknown setting; did you mean `{suggested}`?"
        )

    def test_every_problem_is_reported_at_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Problems in several sources give one error listing each on its own line."""
        toml = tmp_path / "n.toml"
        toml.write_text('workres = 4\nobserver = "fsevents"\n')
        monkeypatch.setenv("NIFTIDROP_WORKRES", "4")
        monkeypatch.setenv("NIFTIDROP_FSYNC", "maybe")
        with pytest.raises(ConfigError) as raised:
            load_settings(toml, compression_level="9")
        assert sorted(raised.value.problems) == [
            f'{toml}, key observer: expected one of: auto, inotify, polling, found "fsevents"',
            f"{toml}, key workres: unknown setting; did you mean `workers`?",
            'environment variable NIFTIDROP_FSYNC: expected true or false, found "maybe"',
            "environment variable NIFTIDROP_WORKRES: unknown setting; "
            "did you mean `NIFTIDROP_WORKERS`?",
            'flag --compression-level: expected a whole number from 0 to 3, found "9"',
        ]
        assert str(raised.value).startswith("5 problems in the configuration:\n  ")

    def test_the_source_whose_value_is_used_is_named(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A setting given in the TOML file and the environment is blamed on the
        environment: that is the value that was used."""
        toml = tmp_path / "n.toml"
        toml.write_text("workers = 0\n")
        monkeypatch.setenv("NIFTIDROP_WORKERS", "-3")
        with pytest.raises(ConfigError, match=r'^environment variable NIFTIDROP_WORKERS: .*"-3"$'):
            load_settings(toml)

    def test_variables_in_any_case(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """pydantic reads `niftidrop_workers` as well: the message names it as written."""
        monkeypatch.setenv("niftidrop_workers", "many")
        with pytest.raises(ConfigError, match=r"^environment variable niftidrop_workers: "):
            load_settings()

    def test_the_config_variable_is_no_unknown_setting(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """NIFTIDROP_CONFIG names the TOML file: it is not taken for a misspelt setting."""
        toml = tmp_path / "n.toml"
        toml.write_text("workers = 1\n")
        monkeypatch.setenv("NIFTIDROP_CONFIG", str(toml))
        assert load_settings().workers == 1

    def test_the_hook_variables_are_no_unknown_settings(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A hook that runs niftidrop inherits NIFTIDROP_EVENT and the others: accepted."""
        for name in HOOK_VARIABLES.values():
            monkeypatch.setenv(name, "/srv/spool/archive/a.npy")
        assert load_settings(workers=1).workers == 1

    def test_no_hook_variable_names_a_setting(self) -> None:
        """A hook variable is never read as a setting by a niftidrop the hook runs."""
        settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
        assert not settings & set(HOOK_VARIABLES.values())

    def test_a_name_close_to_nothing_points_to_the_readme(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unknown variable like no setting says where the settings are listed."""
        monkeypatch.setenv("NIFTIDROP_XYZZY", "1")
        with pytest.raises(ConfigError) as raised:
            load_settings()
        assert str(raised.value) == (
            "environment variable NIFTIDROP_XYZZY: unknown setting "
            "(the README's Configuration section lists every setting)"
        )

    def test_a_validator_says_why(self) -> None:
        """A value of the right type that a validator refuses says why, after the value."""
        with pytest.raises(ConfigError) as raised:
            load_settings(key_pattern="(?P<name>case\\d+)")
        assert str(raised.value) == (
            "flag --key-pattern: expected a regular expression with a group named key, "
            '(?P<key>...), found "(?P<name>case\\\\d+)" (it has no group named key)'
        )

    def test_long_values_are_cut(self) -> None:
        """A long value is quoted up to 120 characters."""
        with pytest.raises(ConfigError) as raised:
            load_settings(dtype="x" * 500)
        assert '"' + "x" * 118 + "…" in str(raised.value)
        assert len(str(raised.value)) < 300


class TestConfigFile:
    def test_a_missing_flag_file(self, tmp_path: Path) -> None:
        """`--config` naming no file says so, naming the flag."""
        with pytest.raises(ConfigError, match=r"^flag --config: file '.*absent.toml' does not"):
            find_config_file(tmp_path / "absent.toml")

    def test_a_missing_variable_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """NIFTIDROP_CONFIG naming no file says so, naming the variable."""
        monkeypatch.setenv("NIFTIDROP_CONFIG", str(tmp_path / "absent.toml"))
        with pytest.raises(
            ConfigError,
            match=r"^environment variable NIFTIDROP_CONFIG: file '.*absent.toml' does not",
        ):
            load_settings()

    def test_invalid_toml_names_the_file_and_line(self, tmp_path: Path) -> None:
        """A TOML syntax error names the file and where in it."""
        toml = tmp_path / "n.toml"
        toml.write_text("workers = 4\nworkers 5\n")
        with pytest.raises(ConfigError, match=rf"^{toml}: not valid TOML: .*line 2"):
            read_toml(toml)


class TestAllowed:
    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("settle_seconds", "a number, at least 0"),
            ("incomplete_timeout", "a number, above 0"),
            ("max_attempts", "a whole number, at least 1"),
            ("fsync", "true or false"),
            ("after_success", "one of: archive, delete"),
            ("separators", "text, at least 1 character(s)"),
            ("state_dir", "a path"),
            ("npz_key", "text"),
            ("metrics_address", "host:port with a port from 1 to 65535, e.g. 127.0.0.1:9464"),
        ],
    )
    def test_in_words(self, name: str, expected: str) -> None:
        """Each setting's type, range or choices read as words; the settings model's
        own words where the type says too little."""
        assert allowed(name, Settings.model_fields[name], ALLOWED) == expected

    def test_every_setting_has_words(self) -> None:
        """No setting is described by a bare type name."""
        for name, field in Settings.model_fields.items():
            words = allowed(name, field, ALLOWED)
            assert words, name
            assert "<class" not in words, name
            assert "typing" not in words, name


class _Profile(BaseModel):
    """A table inside a list, as `[[profiles]]` tables are."""

    model_config = ConfigDict(extra="forbid")
    workers: int = 1
    axis_order: Literal["xyz", "zyx"] = "xyz"


class _WithTables(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profiles: list[_Profile] = []


class TestNestedTables:
    def test_a_key_inside_a_table_is_located(self, tmp_path: Path) -> None:
        """Problems inside an array of tables name the key's path, the closest key of
        that table, and the value found there."""
        toml = tmp_path / "n.toml"
        toml.write_text('[[profiles]]\nworkres = 2\n[[profiles]]\naxis_order = "zxy"\n')
        sources = Sources({}, {}, toml)
        with pytest.raises(ValidationError) as raised:
            _WithTables.model_validate(sources.toml)
        assert sources.explain(_WithTables, raised.value) == [
            f"{toml}, key profiles[0].workres: unknown setting; did you mean `workers`?",
            f'{toml}, key profiles[1].axis_order: expected one of: xyz, zyx, found "zxy"',
        ]


def _check(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`niftidrop check ARGS` run in `cwd` with the environment plus `env`."""
    (cwd / "library").mkdir(exist_ok=True)
    return subprocess.run(
        [str(NIFTIDROP), "check", "--root", str(cwd), *args],
        check=False,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


class TestThroughCheck:
    @pytest.mark.parametrize("source", SOURCES)
    def test_each_kind_of_error_from_each_source(self, tmp_path: Path, source: Source) -> None:
        """`niftidrop check` exits 2, prints no settings, and gives one line per problem:
        the source, what is allowed, the value found; unknown names get a suggestion."""
        toml = Path("niftidrop.toml")  # found in the working folder
        values = {name: value for _, name, value, _ in INVALID}
        args: list[str] = []
        env: dict[str, str] = {}
        if source == "flag":
            args = [
                item
                for name, v in values.items()
                for item in ("--" + name.replace("_", "-"), str(v))
            ]
        elif source == "env":
            env = {
                "NIFTIDROP_" + name.upper(): str(v) for name, v in {**values, "workres": 4}.items()
            }
        else:
            text = "".join(
                f"{name} = {json.dumps(v)}\n" for name, v in {**values, "workres": 4}.items()
            )
            (tmp_path / toml).write_text(text)
        checked = _check(tmp_path, *args, env=env)
        assert checked.returncode == 2, checked.stderr
        assert checked.stdout == ""
        lines = checked.stderr.splitlines()
        assert (
            lines[0]
            == f"niftidrop: {len(values) + (source != 'flag')} problems in the configuration:"
        )
        for _, name, value, expected in INVALID:
            where = _where(source, name, toml)
            assert f"  {where}: expected {expected}, found {_found(source, value)}" in lines
        if source != "flag":
            suggested = "NIFTIDROP_WORKERS" if source == "env" else "workers"
            where = _where(source, "workres", toml)
            assert f"  {where}: unknown setting; did you mean `{suggested}`?" in lines

    def test_an_unknown_flag(self, tmp_path: Path) -> None:
        """A misspelt flag is refused by the command line itself, with exit 2, naming it."""
        checked = _check(tmp_path, "--workres", "4")
        assert checked.returncode == 2
        assert "unrecognized arguments: --workres 4" in checked.stderr

    def test_a_single_problem_is_one_line(self, tmp_path: Path) -> None:
        """`NIFTIDROP_WORKERS=abc niftidrop check` prints the one line the README shows."""
        checked = _check(tmp_path, env={"NIFTIDROP_WORKERS": "abc"})
        assert checked.returncode == 2
        assert checked.stderr == (
            "niftidrop: environment variable NIFTIDROP_WORKERS: expected a whole number, "
            'at least 1, found "abc"\n'
        )
