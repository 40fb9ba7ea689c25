"""Fixtures shared by every test module."""

from __future__ import annotations

import os

import pytest

from niftidrop.settings import ENV_PREFIX


@pytest.fixture(autouse=True)
def _isolated_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each test starts with no NIFTIDROP_* variables and in an empty working folder."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) or name == "NOTIFY_SOCKET":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
