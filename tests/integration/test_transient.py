"""Transient faults (README: File protocol): inputs wait claimed, `input_retrying` is logged,
nothing goes to failed, and everything converts once the cause is gone.

The tests run as root, where a read-only mode bit does not stop writes, so the
fault is made real another way: the input's subfolder of the outbox (archive,
failed) is a plain file for a while, so every write there fails with an OSError
(FileExistsError / NotADirectoryError) as an unwritable mount would. Removing
that file, one atomic step, is the fix.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from support import (
    ThreadedService,
    conversion_processes,
    drop_by_rename,
    files_in,
    output_of,
    prediction,
)

from spools import instance_folder
from waiting import wait_until


@contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """Inside the block `folder` is a plain file, so nothing can be written into it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_bytes(b"")
    try:
        yield
    finally:
        folder.unlink()


def claimed(root: Path) -> list[str]:
    return files_in(instance_folder(root) / "claimed")


class TestTransientFaults:
    def test_unwritable_outbox_is_retried_then_converted(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Outbox unusable: retried with backoff, never failed, converted once fixed."""
        service = start_service(root)
        with unwritable(root / "outbox" / "site"):
            drop_by_rename(root / "inbox", "site/case_1.npy", prediction(1))
            wait_until(lambda: len(service.events("input_retrying")) >= 2, what="two retries")
            assert [Path(name).name for name in claimed(root)] == ["case_1.npy"]
            assert files_in(root / "failed") == []
        wait_until(lambda: service.events("input_converted"), timeout=60)
        retries = service.events("input_retrying")
        assert retries[0]["input"] == "site/case_1.npy"
        assert retries[1]["retry_in"] > retries[0]["retry_in"]  # backoff grows
        assert np.array_equal(output_of(root, "site/case_1.npy"), prediction(1))
        assert files_in(root / "archive") == ["site/case_1.npy"]
        assert files_in(root / "failed") == []
        assert len(service.events("input_converted")) == 1

    def test_unwritable_archive_keeps_the_output_and_does_not_convert_again(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Archive unusable after a durable output: retried, archived later, converted once."""
        service = start_service(root)
        with unwritable(root / "archive" / "site"):
            drop_by_rename(root / "inbox", "site/case_2.npy", prediction(2))
            wait_until(lambda: service.events("input_retrying"), what="a retry")
            assert (root / "outbox" / "site" / "case_2.nii.gz").is_file()
        wait_until((root / "archive" / "site" / "case_2.npy").is_file, timeout=60)
        wait_until(lambda: service.events("input_converted"))
        assert len(service.events("input_converted")) == 1
        assert files_in(root / "failed") == []
        assert files_in(root / "outbox") == ["site/case_2.nii.gz"]

    def test_unwritable_failed_folder_delays_a_rejection(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """A rejection that cannot be written yet waits claimed, then lands with its record."""
        service = start_service(root)
        with unwritable(root / "failed" / "site"):
            drop_by_rename(root / "inbox", "site/orphan.npy", prediction(3))
            wait_until(lambda: service.events("input_retrying"), what="a retry")
            assert len(claimed(root)) >= 1
        wait_until((root / "failed" / "site" / "orphan.npy.error.json").is_file, timeout=60)
        assert files_in(root / "failed") == ["site/orphan.npy", "site/orphan.npy.error.json"]
        wait_until(lambda: service.events("input_failed"), what="input_failed")
        assert len(service.events("input_failed")) == 1

    def test_other_inputs_keep_flowing_during_a_fault(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """A fault in one subfolder of the outbox does not hold up inputs elsewhere."""
        service = start_service(root)
        with unwritable(root / "outbox" / "site"):
            drop_by_rename(root / "inbox", "site/case_3.npy", prediction(3))
            wait_until(lambda: service.events("input_retrying"), what="a retry")
            drop_by_rename(root / "inbox", "case_4.npy", prediction(4))
            wait_until((root / "archive" / "case_4.npy").is_file)
        wait_until((root / "archive" / "site" / "case_3.npy").is_file, timeout=60)
        assert files_in(root / "failed") == []

    def test_a_conversion_process_killed_mid_conversion_is_retried(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """A conversion process that dies (a crash, the OOM killer) costs a retry, not
        the input: it stays claimed and a new process converts it."""
        service = start_service(root, workers=1)
        (child,) = conversion_processes(os.getpid())
        os.kill(child, signal.SIGSTOP)  # the request waits for it: the kill lands mid-call
        drop_by_rename(root / "inbox", "case_5.npy", prediction(5))
        wait_until(lambda: claimed(root), what="the claim")
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: service.events("input_converted"), timeout=60)
        (retry,) = service.events("input_retrying")
        assert retry["input"] == "case_5.npy"
        assert "killed by SIGKILL" in retry["error"]
        assert np.array_equal(output_of(root, "case_5.npy"), prediction(5))
        assert files_in(root / "archive") == ["case_5.npy"]
        assert files_in(root / "failed") == []
        assert conversion_processes(os.getpid()) not in ([], [child])
