"""Tests of the command line's help (`niftidrop.usage`): every help fits on a screen,
says what the command does and its exit codes, and shows the settings' choices and
defaults as the settings model defines them."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from niftidrop.cli import ExitCode, main
from niftidrop.settings import Settings
from niftidrop.usage import COMMANDS, choices, default_text, setting_help
from real_command import niftidrop

HELP_LINES = 40
# Every help: the program's own, and each command's.
HELPS = [[], *([command.name] for command in COMMANDS)]
HELP_IDS = ["niftidrop", *(command.name for command in COMMANDS)]
# The choice settings a new user found without their choices (README issue 12).
CHOICE_SETTINGS = [
    "axis_order",
    "channels",
    "on_conflict",
    "observer",
    "after_success",
    "log_format",
    "missing_reference",
]


@pytest.fixture(autouse=True)
def _eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What `niftidrop ARGV --help` prints, through `main`; it exits 0."""
    assert main([*argv, "--help"]) == ExitCode.OK
    return capsys.readouterr().out


def exit_codes(text: str) -> dict[int, str]:
    """The "exit codes:" section of a help: code -> meaning (continuations joined)."""
    section = text[text.index("\nexit codes:\n") :].split("\n\n", maxsplit=1)[0].splitlines()[2:]
    codes: dict[int, str] = {}
    for line in section:
        found = re.match(r"  (\d)  (.*)", line)
        if found:
            codes[int(found[1])] = found[2]
        else:
            codes[max(codes)] += " " + line.strip()
    return codes


def shown_flags(text: str) -> set[str]:
    """The settings flags a help lists (options at the start of a line)."""
    flags = re.findall(r"^  (--[a-z-]+)", text, flags=re.MULTILINE)
    return {
        flag for flag in flags if flag.removeprefix("--").replace("-", "_") in Settings.model_fields
    }


def setting_entry(text: str, flag: str) -> str:
    """What a help (whitespace joined) says after `flag`, up to the next option."""
    entry = text[text.index(f" {flag} ") + len(flag) + 2 :]
    following = re.search(r" --?[a-z]", entry)
    return entry[: following.start()] if following else entry


class TestEveryHelp:
    @pytest.mark.parametrize("argv", HELPS, ids=HELP_IDS)
    def test_fits_in_40_lines(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        """The help fits in 40 lines of an 80-column terminal, none wider."""
        lines = help_text(argv, capsys).splitlines()
        assert len(lines) <= HELP_LINES
        assert max(len(line) for line in lines) <= 80

    @pytest.mark.parametrize("argv", HELPS, ids=HELP_IDS)
    def test_starts_with_what_it_does(
        self, argv: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Right after the usage line comes a paragraph of prose saying what it does."""
        usage, description, *_ = help_text(argv, capsys).split("\n\n")
        assert usage.startswith(f"usage: niftidrop {' '.join(argv)}".rstrip())
        assert len(description) > 150
        assert description.endswith(".")
        assert not description.lstrip().startswith(("-", "{"))

    @pytest.mark.parametrize("command", COMMANDS, ids=HELP_IDS[1:])
    def test_names_the_exit_codes_the_command_returns(
        self, command: typing.Any, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The exit codes section names exactly the codes this command can return
        (3 only for run), each with what it means."""
        codes = exit_codes(help_text([command.name], capsys))
        assert sorted(codes) == sorted(command.exits)
        assert set(codes) <= set(ExitCode)
        assert {ExitCode.OK, ExitCode.BAD_CONFIG} <= set(codes)
        assert (ExitCode.SERVICE_FAILED in codes) == (command.name == "run")
        assert all(len(meaning) > 5 for meaning in codes.values())

    def test_the_program_names_every_exit_code(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`niftidrop --help` names every exit code and lists every command."""
        text = help_text([], capsys)
        assert sorted(exit_codes(text)) == sorted(ExitCode)
        for command in COMMANDS:
            assert re.search(rf"^    {command.name}\s+{re.escape(command.summary)}", text, re.M)

    @pytest.mark.parametrize("argv", HELPS, ids=HELP_IDS)
    def test_says_where_every_setting_is(
        self, argv: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Each help says that every setting is also a variable and a TOML key, and
        where they are all listed."""
        text = " ".join(help_text(argv, capsys).split())
        assert "NIFTIDROP_" in text
        assert "TOML" in text
        assert "--help-settings lists them all" in text
        assert 'README "Configuration"' in text

    def test_the_real_command_prints_the_same(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The installed `niftidrop` executable prints each of these helps, exit 0."""
        for argv in HELPS:
            result = niftidrop(*argv, "--help")
            assert result.returncode == ExitCode.OK, result.stderr
            assert result.stdout == help_text(argv, capsys)
            assert len(result.stdout.splitlines()) <= HELP_LINES


class TestSettingsInTheHelp:
    @pytest.mark.parametrize("name", CHOICE_SETTINGS)
    def test_choice_settings_show_choices_and_default(
        self, name: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--help-settings shows each choice setting's `Literal` values and default,
        as the settings model has them."""
        field = Settings.model_fields[name]
        assert typing.get_origin(field.annotation) is Literal
        allowed = ",".join(str(value) for value in typing.get_args(field.annotation))
        assert main(["--help-settings"]) == ExitCode.OK
        text = " ".join(capsys.readouterr().out.split())
        entry = setting_entry(text, "--" + name.replace("_", "-"))
        assert entry.startswith(f"{{{allowed}}} ")
        assert entry.endswith(f"(default: {field.default})")

    def test_every_setting_is_listed_with_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--help-settings lists every field of the settings model, each with what it is
        and its default; it is the same from a command."""
        assert main(["--help-settings"]) == ExitCode.OK
        text = capsys.readouterr().out
        assert main(["check", "--help-settings"]) == ExitCode.OK
        assert capsys.readouterr().out == text
        assert shown_flags(text) == {
            "--" + name.replace("_", "-") for name in Settings.model_fields
        }
        for name, field in Settings.model_fields.items():
            assert not setting_help(name, field).startswith(" (default"), name
        assert "NIFTIDROP_CONFIG" in text

    @pytest.mark.parametrize("command", COMMANDS, ids=HELP_IDS[1:])
    def test_a_command_lists_only_its_settings(
        self, command: typing.Any, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A command's help lists the settings that concern it, and no other one."""
        text = help_text([command.name], capsys)
        expected = {"--" + name.replace("_", "-") for name in command.settings if name != "config"}
        assert shown_flags(text) == expected
        assert "--config PATH" in text

    def test_settings_left_out_of_a_help_are_accepted(self, tmp_path: Path) -> None:
        """A setting a command's help does not list still works with it."""
        (tmp_path / "inbox").mkdir()
        argv = ["status", "--root", str(tmp_path), "--axis-order", "zyx", "--no-fsync"]
        assert main(argv) == ExitCode.OK


class TestChoicesAndDefaults:
    class Model(BaseModel):
        mode: Literal["a", "b"] = "a"
        maybe: Literal["x", "y"] | None = None
        count: int = Field(default_factory=lambda: 7)
        folders: list[Path] = Field(default_factory=lambda: [Path("one"), Path("two")])
        period: float = 30.0
        on: bool = True

    def test_choices_come_from_the_literal(self) -> None:
        """A `Literal` gives its values, also inside `| None`; other types none."""
        fields = self.Model.model_fields
        assert choices(fields["mode"]) == ("a", "b")
        assert choices(fields["maybe"]) == ("x", "y")
        assert choices(fields["count"]) is None

    def test_defaults_are_shown_as_in_toml(self) -> None:
        """Defaults read as a TOML file would have them; a number a factory computes
        is said to be this machine's."""
        fields = self.Model.model_fields
        shown = {name: default_text(field) for name, field in fields.items()}
        assert shown == {
            "mode": "a",
            "maybe": "none",
            "count": "7 on this machine",
            "folders": "one, two",
            "period": "30",
            "on": "true",
        }
