"""Tests of the spool check under a running service: put back, or stop."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from niftidrop.errors import ServiceError
from niftidrop.guard import SpoolGuard
from niftidrop.settings import load_settings
from niftidrop.spool import Spool


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[SpoolGuard]:
    spool = Spool(load_settings(root=tmp_path, fsync=False))
    spool.create_folders()
    spool.lock()
    guard = SpoolGuard(spool)
    guard.start()
    yield guard
    spool.unlock()


class TestCheck:
    def test_an_untouched_spool_passes_quietly(self, guard: SpoolGuard) -> None:
        """Nothing changed: no error, nothing logged."""
        with capture_logs() as logs:
            guard.check()
        assert logs == []

    def test_a_removed_state_folder_is_made_again(self, guard: SpoolGuard) -> None:
        """The claims folder and the lock come back; state_recreated names both."""
        shutil.rmtree(guard.spool.state)
        with capture_logs() as logs:
            guard.check()
        assert guard.spool.claims_folder.is_dir()
        (line,) = logs
        assert line["event"] == "state_recreated"
        assert len(line["made"]) == 2

    def test_a_replaced_inbox_is_a_service_error(self, guard: SpoolGuard, tmp_path: Path) -> None:
        """An inbox renamed away and made anew stops the service."""
        inbox = guard.spool.inbox
        inbox.rename(tmp_path / "old-inbox")
        inbox.mkdir()
        with pytest.raises(ServiceError, match="replaced"):
            guard.check()
