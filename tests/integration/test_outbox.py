"""The outbox as consumers and crashes see it: every output delivered exactly once,
and no temporary file of a dead conversion left behind."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from support import (
    ThreadedService,
    conversion_processes,
    drop_by_rename,
    files_in,
    prediction,
    write_reference,
)

from niftidrop.names import is_temp_name
from waiting import wait_until

INPUTS = 30


def consume(outbox: Path, taken: Path, stop: threading.Event, seen: Counter[str]) -> None:
    """A downstream tool that moves each output away the moment it appears."""
    while not stop.is_set():
        for root, _, names in os.walk(outbox):
            for name in names:
                if name.startswith(".") or not name.endswith(".nii.gz"):
                    continue
                try:
                    (Path(root) / name).rename(taken / f"{name}.{seen[name]}")
                except FileNotFoundError:
                    continue
                seen[name] += 1


def temporaries(folder: Path) -> list[str]:
    return [name for name in files_in(folder) if is_temp_name(Path(name).name)]


class TestOutbox:
    def test_an_eager_consumer_gets_every_output_exactly_once(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Outputs moved away as they appear: each input converted once, none retried."""
        taken = root / "taken"
        taken.mkdir()
        seen: Counter[str] = Counter()
        stop = threading.Event()
        consumer = threading.Thread(target=consume, args=(root / "outbox", taken, stop, seen))
        service = start_service(root)
        consumer.start()
        try:
            for index in range(INPUTS):
                drop_by_rename(root / "inbox", f"case_{index:02d}.npy", prediction(index))
            wait_until(
                lambda: len(files_in(root / "archive")) == INPUTS, timeout=90, what="archived"
            )
            wait_until(lambda: sum(seen.values()) >= INPUTS, what="every output taken")
            # Logged just after the archive move: the last line may follow a moment later.
            wait_until(lambda: len(service.events("input_converted")) >= INPUTS, what="every line")
        finally:
            stop.set()
            consumer.join()
        assert service.events("input_retrying") == []
        assert len(service.events("input_converted")) == INPUTS
        assert seen == Counter({f"case_{index:02d}.nii.gz": 1 for index in range(INPUTS)})
        assert files_in(root / "failed") == []

    def test_a_killed_conversion_leaves_no_temporary(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """A conversion process killed while it writes: its temporary file goes at once
        (not at the next start), and the retry converts the input."""
        shape = (160, 160, 160)
        write_reference(root / "library" / "case.nii.gz", shape)
        service = start_service(root, workers=1)
        data = np.random.default_rng(7).random(shape).astype(np.float32)  # slow to compress
        drop_by_rename(root / "inbox", "case_big.npy", data)
        wait_until(lambda: temporaries(root / "outbox"), what="the output being written")
        written = temporaries(root / "outbox")
        for child in conversion_processes(os.getpid()):
            os.kill(child, signal.SIGKILL)
        wait_until(lambda: service.events("input_retrying"), what="a retry")
        assert not any((root / "outbox" / name).exists() for name in written)
        wait_until(lambda: service.events("input_converted"), timeout=90, what="converted")
        assert files_in(root / "outbox") == ["case_big.nii.gz"]
        assert files_in(root / "archive") == ["case_big.npy"]
