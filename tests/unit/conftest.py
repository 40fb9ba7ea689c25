"""Fixtures of the unit tests: a spool on temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from niftidrop.settings import Settings, load_settings
from niftidrop.spool import Spool


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(root=tmp_path, fsync=False)


@pytest.fixture
def spool(settings: Settings) -> Spool:
    spool = Spool(settings)
    spool.create_folders()
    return spool
