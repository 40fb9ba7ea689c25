"""Fault injection for the file protocol: scenarios, one input's life, and the audit.

A scenario is one input and the settings it is converted with. Its life runs
through `niftidrop.steps`: a hook sees every file-system step, and may raise an
errno at one of them (the in-process matrix) or kill the process there (the
kill matrix, `fault_runner.py`). The audit checks the guarantees afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from support import save_npy, write_reference

from niftidrop import api
from niftidrop.claims import COMMIT_RECORD, Claim
from niftidrop.errors import ConversionError
from niftidrop.listing import scan_inbox
from niftidrop.names import is_temp_name
from niftidrop.service import Service
from niftidrop.settings import Settings, load_settings
from niftidrop.spool import Spool
from niftidrop.steps import hooked
from spools import instance_folder

ERRNOS = (
    errno.ENOSPC,
    errno.EIO,
    errno.EACCES,
    errno.EROFS,
    errno.EEXIST,
    errno.ENOENT,
    errno.ENAMETOOLONG,
    errno.EXDEV,
    errno.EMLINK,
)
INPUT = "site/case.npy"
SHAPE = (4, 3, 2)


@dataclass(frozen=True, eq=False)  # hashed by identity: one object per scenario
class Scenario:
    """One input's way through the spool."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    rejected: bool = False  # its shape does not fit the reference: it ends in failed
    other_file_system: bool = False  # links into archive and failed are refused (EXDEV)
    hooked: bool = False  # on_converted records each event it is given (README: Hand-off)

    def array(self) -> np.ndarray[Any, Any]:
        shape = (5, 5, 5) if self.rejected else (*SHAPE, 2) if self.split else SHAPE
        return (np.arange(int(np.prod(shape))) % 5).astype(np.uint8).reshape(shape)

    @property
    def split(self) -> bool:
        return self.settings.get("channels") == "split"


SCENARIOS = (
    Scenario("archived"),
    Scenario("deleted", {"after_success": "delete"}),
    # Label names: a `dseg.tsv` beside the outputs (its own steps), with a redo's journal.
    Scenario("renamed", {"on_conflict": "rename", "labels": {"1": "one"}}),
    Scenario(
        "split", {"channels": "split", "sidecar": True, "labels": {"1": "one"}, "preview": True}
    ),
    Scenario("failed", rejected=True),
    Scenario("copied", other_file_system=True),
    Scenario("copied_failed", rejected=True, other_file_system=True),
    Scenario("hooked", hooked=True),
)
# The hooked scenario's on_converted: appends the event it reads to the file it names.
HOOK = "import sys; open(sys.argv[1], 'a').write(sys.stdin.read() + '\\n')"
HOOK_LOG = "hooked.jsonl"


@contextmanager
def fast_folder() -> Iterator[Path]:
    """A temporary folder, in memory where possible: fsync is real but costs nothing."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=parent, prefix="niftidrop-faults-") as folder:
        yield Path(folder)


def prepare(root: Path, scenario: Scenario) -> Settings:
    """A spool at `root` with the reference and the scenario's input in the inbox."""
    write_reference(root / "library" / "case.nii.gz", SHAPE)
    path = save_npy(root / "inbox" / INPUT, scenario.array())
    os.utime(path, (1_000_000_000, 1_000_000_000))  # long quiet: ready at once
    return settings_for(root, scenario)


def settings_for(root: Path, scenario: Scenario) -> Settings:
    values: dict[str, Any] = {
        "root": root,
        "fsync": True,
        "workers": 1,
        "settle_seconds": 0.05,
        "heartbeat_interval": 60,  # no beat inside a case
        "lease_timeout": 120,
        "shutdown_timeout": 10,
        **scenario.settings,
    }
    if scenario.hooked:
        values["on_converted"] = [sys.executable, "-c", HOOK, str(root / HOOK_LOG)]
    return load_settings(**values)


class Faults:
    """The step hook: counts every step, raises `fault` at step number `at`, and makes
    links out of the claim folder fail with EXDEV for `other_file_system`."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        at: int = -1,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.at = at
        self.fault = fault
        self.trace: list[str] = []

    def __call__(self, name: str) -> None:
        self.trace.append(name)
        if len(self.trace) - 1 == self.at and self.fault is not None:
            self.fault(name)
        if self.scenario.other_file_system and name == "input_link":
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))


def raising(code: int) -> Callable[[str], None]:
    def fault(name: str) -> None:
        raise OSError(code, f"{os.strerror(code)} (injected at {name})")

    return fault


def kill(name: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def converter(spool: Spool, settings: Settings) -> Callable[[Claim], dict[str, Any]]:
    """What the service's workers do for a claim, in this process."""
    reference = settings.root / "library" / "case.nii.gz"

    def convert(claim: Claim) -> dict[str, Any]:
        result = api.convert_file(
            claim.path,
            spool.outbox / claim.subfolder,
            settings=settings,
            reference=reference,
            stem=claim.stem,
            provenance={"input": str(claim.relative)},  # as the workers pass it
            owner=spool.owner_for(claim),
            journal=claim.folder / COMMIT_RECORD if spool.remember_conversions else None,
        )
        return {"input": str(claim.relative), "output": [str(p) for p in result.outputs]}

    return convert


@dataclass
class Life:
    """What a life under a fault left: the spool, the claim (if made), the error."""

    spool: Spool
    claim: Claim | None = None
    error: OSError | None = None


def live(settings: Settings, scenario: Scenario, hook: Faults) -> Life:
    """Claim and finish the input under `hook`; stops at the first OSError."""
    spool = Spool(settings)
    spool.create_folders()
    spool.lock()
    life = Life(spool)
    try:
        with hooked(hook):
            life.claim = spool.claim(settings.inbox_dir / INPUT)
            if life.claim is not None:
                spool.handle(life.claim, converter(spool, settings))
    except OSError as error:
        life.error = error
    finally:
        spool.unlock()
    return life


def retry(life: Life, scenario: Scenario) -> None:
    """What the service does next, the fault gone: handle a claim that failed again,
    and claim what is still in the inbox (a claim that failed, or found nothing to
    rename). A claim handled to its end is not handled again: its folder is gone."""
    spool, settings = life.spool, settings_for(life.spool.inbox.parent, scenario)
    with hooked(Faults(scenario)):
        if life.claim is not None and life.error is not None:
            spool.handle(life.claim, converter(spool, settings))
        for path in scan_inbox(spool.inbox, recursive=True):
            claim = spool.claim(path)
            if claim is not None:
                spool.handle(claim, converter(spool, settings))


def restart(settings: Settings, scenario: Scenario) -> int:
    """The real service, `run --once`, as after a crash."""
    with hooked(Faults(scenario)):
        return Service(settings, convert_file=api.convert_file).run(once=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under `folder` (hidden ones included)."""
    if not folder.is_dir():
        return {}
    return {
        str(path.relative_to(folder)): digest(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() or path.is_symlink()
    }


def outputs(root: Path) -> dict[str, str]:
    """The outbox without sidecars (whose time stamp differs from one run to the next)."""
    return {name: value for name, value in files(root / "outbox").items() if ".json" not in name}


def audit_consistent(root: Path, scenario: Scenario, data: str) -> list[str]:
    """Right after a fault: the input is somewhere, no partial output is visible, a
    convertible input is never in failed."""
    problems = []
    places = [
        name
        for folder in ("inbox", "archive", "failed")
        for name, value in files(root / folder).items()
        if value == data
    ]
    deleted = scenario.settings.get("after_success") == "delete"
    if not places and not (deleted and outputs(root)):
        problems.append("the input is nowhere")
    if not scenario.rejected and files(root / "failed"):
        problems.append(f"a transient fault sent the input to failed: {files(root / 'failed')}")
    for name in files(root / "outbox"):
        if name.endswith(".nii.gz"):
            problems.extend(_whole_gzip(root / "outbox" / name))
    return problems


def _whole_gzip(path: Path) -> list[str]:
    import gzip

    try:
        gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        return [f"{path.name} is not whole: {error}"]
    return []


def audit_final(
    root: Path, scenario: Scenario, data: str, expected: dict[str, str], *, renamed: bool
) -> list[str]:
    """After recovery: the input in exactly one place, the outputs exactly once with
    the expected bytes, no claim, no temporary file, no record left."""
    problems = []
    inbox = {k: v for k, v in files(root / "inbox").items() if not k.startswith(".niftidrop")}
    archive, failed = files(root / "archive"), files(root / "failed")
    kept = [value for value in [*inbox.values(), *archive.values()] if value == data]
    failed_inputs = [name for name in failed if not name.endswith(".error.json")]
    if scenario.rejected:
        if inbox or archive or len(failed_inputs) != 1:
            problems.append(f"expected the input once in failed: {inbox} {archive} {failed}")
        elif f"{failed_inputs[0]}.error.json" not in failed:
            problems.append(f"{failed_inputs[0]} has no .error.json")
    elif scenario.settings.get("after_success") == "delete":
        if kept or failed:
            problems.append(f"expected the input deleted: {inbox} {archive} {failed}")
    elif inbox or failed or len(kept) != 1 or len(archive) != 1:
        problems.append(f"expected the input once in archive: {inbox} {archive} {failed}")
    found = outputs(root)
    if renamed:  # an injected EEXIST is a taken name: a suffixed one is right
        if sorted(found.values()) != sorted(expected.values()):
            problems.append(f"outputs {found}, expected {expected}")
    elif found != expected:
        problems.append(f"outputs {found}, expected {expected}")
    claimed = list(files(instance_folder(root) / "claimed"))
    if claimed:
        problems.append(f"left in the claim folders: {claimed}")
    for folder in ("outbox", "archive", "failed", "inbox/.niftidrop"):
        temporaries = [name for name in files(root / folder) if is_temp_name(Path(name).name)]
        if temporaries:
            problems.append(f"temporary files left in {folder}: {temporaries}")
    return problems


def audit_hand_off(root: Path, *, delivered: bool, twice: bool = False) -> list[str]:
    """The hooked scenario's event: still pending once (`delivered` False: nothing ran
    the delivery), or delivered and gone; delivered once, or with `twice` (a kill
    between the delivery and the event's removal) maybe twice, under one id."""
    events = instance_folder(root) / "events"
    kept = sorted(events.glob("*.json")) if events.is_dir() else []
    log = root / HOOK_LOG
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not delivered:
        if len(kept) != 1 or runs:
            return [f"expected one pending event and no hook run: {kept} {runs}"]
        return []
    problems = []
    if kept:
        problems.append(f"events left pending after the restart: {kept}")
    if len(runs) not in ((1, 2) if twice else (1,)) or len({run["id"] for run in runs}) != 1:
        problems.append(f"expected the hook run once{' (or twice)' if twice else ''}: {runs}")
    elif runs[0]["archived"] != str(root / "archive" / INPUT):
        problems.append(f"the event names {runs[0]['archived']}, not the archived input")
    return problems


def expected_outputs(scenario: Scenario) -> tuple[dict[str, str], list[str]]:
    """The outputs of a life without faults, and the steps it took."""
    with fast_folder() as root:
        settings = prepare(root, scenario)
        hook = Faults(scenario)
        life = live(settings, scenario, hook)
        assert life.error is None, life.error
        return outputs(root), hook.trace


def input_digest(scenario: Scenario) -> str:
    with fast_folder() as root:
        path = save_npy(root / "a.npy", scenario.array())
        return digest(path)


__all__ = ["ERRNOS", "SCENARIOS", "ConversionError", "Scenario"]
