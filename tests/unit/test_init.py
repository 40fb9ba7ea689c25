"""The package's facade: its public names, loaded on first use, and the settings model it
gives (README: Python API)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import niftidrop
from niftidrop import api, settings
from niftidrop.settings import load_settings


def _python(code: str, **environment: str) -> str:
    """What `code` prints in a fresh interpreter, with `environment` added to ours."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


class TestPublicNames:
    def test_every_public_name_is_the_object_of_its_module(self) -> None:
        """Each name in `__all__` resolves, to the very object its module defines."""
        for name in niftidrop.__all__:
            assert getattr(niftidrop, name) is not None
        assert niftidrop.Settings is settings.Settings
        assert niftidrop.convert_file is api.convert_file
        assert niftidrop.ConversionResult is api.ConversionResult

    def test_settings_is_importable_from_the_package(self) -> None:
        """`from niftidrop import Settings` gives the settings model."""
        from niftidrop import Settings

        assert Settings.from_values().channels == "keep"

    def test_dir_lists_the_names_loaded_on_first_use(self) -> None:
        """`dir(niftidrop)` shows the lazily loaded names too (for completion)."""
        assert {"Settings", "convert_file", "numpy_to_nifti"} <= set(dir(niftidrop))

    def test_an_unknown_name_is_an_attribute_error(self) -> None:
        """A name the package does not have raises AttributeError naming it."""
        with pytest.raises(AttributeError, match="'Setting'"):
            _ = niftidrop.Setting  # type: ignore[attr-defined]

    def test_import_loads_neither_the_api_nor_the_settings(self) -> None:
        """`import niftidrop` stays quick: numpy, pydantic, the API and the settings
        model load only when one of their names is first used."""
        printed = _python(
            "import sys, niftidrop\n"
            "print([m for m in ('numpy', 'pydantic', 'niftidrop.api', 'niftidrop.settings')"
            " if m in sys.modules])\n"
            "niftidrop.Settings\n"
            "print('niftidrop.settings' in sys.modules, 'niftidrop.api' in sys.modules)\n"
        )
        assert printed.splitlines() == ["[]", "True False"]


class TestSettingsSources:
    def test_settings_reads_niftidrop_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`Settings()` takes NIFTIDROP_<NAME> variables; values passed win over them."""
        monkeypatch.setenv("NIFTIDROP_CHANNELS", "argmax")
        assert niftidrop.Settings().channels == "argmax"
        assert niftidrop.Settings(channels="split").channels == "split"

    def test_from_values_reads_no_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`Settings.from_values` ignores NIFTIDROP_* variables, even invalid ones that
        make `Settings()` fail."""
        monkeypatch.setenv("NIFTIDROP_CHANNELS", "argmax")
        monkeypatch.setenv("NIFTIDROP_WORKERS", "abc")
        with pytest.raises(ValidationError):
            niftidrop.Settings()
        given = niftidrop.Settings.from_values(compress=False)
        assert (given.channels, given.compress) == ("keep", False)

    def test_from_values_reads_no_toml_file(self) -> None:
        """A niftidrop.toml in the working folder fills `load_settings`, not `from_values`."""
        Path("niftidrop.toml").write_text('channels = "argmax"\n')
        assert load_settings().channels == "argmax"
        assert niftidrop.Settings.from_values().channels == "keep"

    def test_from_values_validates_as_settings_does(self) -> None:
        """Values are checked and converted as by `Settings()`: a bad choice or an unknown
        name is refused, a library string is split, and the result is frozen."""
        with pytest.raises(ValidationError, match="channels"):
            niftidrop.Settings.from_values(channels="vectors")
        with pytest.raises(ValidationError, match="workrs"):
            niftidrop.Settings.from_values(workrs=2)
        given = niftidrop.Settings.from_values(library=f"a{os.pathsep}b")
        assert given.library == [Path("a"), Path("b")]
        with pytest.raises(ValidationError):
            given.workers = 1  # type: ignore[misc]

    def test_a_variable_in_a_fresh_process(self) -> None:
        """In a new interpreter with NIFTIDROP_CHANNELS set, `Settings()` reads it and
        `Settings.from_values()` does not."""
        printed = _python(
            "from niftidrop import Settings\n"
            "print(Settings().channels, Settings.from_values().channels)\n",
            NIFTIDROP_CHANNELS="split",
        )
        assert printed == "split keep"
