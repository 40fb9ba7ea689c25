"""Helpers of the spool tests (tests/unit/test_claims.py, test_claiming.py,
test_finishing.py, test_spool.py): inputs dropped, converters, file listings, faults."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from niftidrop.claims import CLAIMS, Claim
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.spool import Spool


def drop(spool: Spool, relative: str, content: bytes = b"data") -> Path:
    path = spool.inbox / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


CLAIMS_FOLDER = f"/{CLAIMS}/"


def converted(claim: Claim) -> dict[str, Any]:
    return {"input": str(claim.relative), "seconds": 0.0}


def rejected(claim: Claim) -> dict[str, Any]:
    raise ConversionError(ErrorCode.SHAPE_MISMATCH, f"{claim.name}: expected (2,), found (3,)")


class Recorder:
    """A converter that records which claims it was asked to convert."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, claim: Claim) -> dict[str, Any]:
        self.names.append(claim.name)
        return converted(claim)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def scan_inbox_names(spool: Spool) -> list[str]:
    """The inbox's files outside the state folder (which holds the owner id)."""
    return [name for name in files_under(spool.inbox) if not name.startswith(".niftidrop/")]


def refuse_links_from_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Archive and failed on another file system: links from the claim folder fail."""
    real_link = os.link

    def link(source: Any, target: Any, **kwargs: Any) -> None:
        if CLAIMS_FOLDER in str(source):
            raise OSError(18, "Invalid cross-device link")
        real_link(source, target, **kwargs)

    monkeypatch.setattr(os, "link", link)


def fail_once(monkeypatch: pytest.MonkeyPatch, method: str, when: Callable[[Path], bool]) -> None:
    """Path.<method> raises EIO the first time `when(path)` holds."""
    real = getattr(Path, method)
    failed: list[Path] = []

    def once(self: Path, *args: Any, **kwargs: Any) -> Any:
        if not failed and when(self):
            failed.append(self)
            raise OSError(5, "Input/output error")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, once)


def instance_folder(root: Path, name: str | None = None) -> Path:
    """The folder of instance `name` (default: this host's name, every test's
    instance) in the default state folder of the spool at `root`."""
    return root / "inbox" / ".niftidrop" / "instances" / (name or socket.gethostname())
