"""Crash safety (README: File protocol): `kill -9` at random moments while files keep arriving.

At the end every input is in archive with an output equal to it (or in failed
with its .error.json), none is missing or duplicated, and no partial or
temporary file is left in the outbox.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support import (
    ServiceProcess,
    drop_by_rename,
    files_in,
    output_of,
    prediction,
    save_npy,
    write_reference,
)

from niftidrop.listing import scan_inbox
from spools import instance_folder
from waiting import wait_until

INPUTS = 240
KILLS = 8
CRASH_SHAPE = (48, 48, 48)  # big enough that kills often land mid-conversion


def produce(inbox: Path, stop: threading.Event) -> None:
    """Drop INPUTS files in bursts over ~6 s: two thirds by rename, a third in place."""
    for index in range(INPUTS):
        name = f"case_{index:04d}.npy"
        relative = name if index % 5 else f"site{index % 3}/{name}"
        if index % 3:
            drop_by_rename(inbox, relative, prediction(index, CRASH_SHAPE))
        else:
            save_npy(inbox / relative, prediction(index, CRASH_SHAPE))
        if index % 16 == 15:
            time.sleep(0.4)  # the producer's pace: bursts keep arriving across every kill
        if stop.is_set():
            return


def waiting(inbox: Path) -> list[Path]:
    """Inputs still in the inbox (the hidden state folder, busy with claims, aside)."""
    return list(scan_inbox(inbox, recursive=True))


@pytest.mark.slow
class TestCrash:
    def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """After repeated kill -9 and restarts, each input ends exactly once, output intact."""
        chance = random.Random(20261126)
        args = ["--settle-seconds", "0.2", "--workers", "2", "--rescan-interval", "2"]
        write_reference(root / "library" / "case.nii.gz", CRASH_SHAPE)
        stop = threading.Event()
        recovered = 0
        producer = threading.Thread(target=produce, args=(root / "inbox", stop))
        producer.start()
        try:
            for kill in range(KILLS):
                process = start_process(root, *args).wait_ready()
                if kill % 2:  # in the middle of a burst of conversions
                    wait_until(
                        lambda process=process: (
                            process.events("input_converted") or not producer.is_alive()
                        ),
                        what="some progress",
                    )
                    time.sleep(chance.uniform(0.0, 0.05))
                else:  # during start-up work: recovery and the backlog
                    time.sleep(chance.uniform(0.0, 0.3))
                assert process.children()
                process.send(signal.SIGKILL)
                process.wait()
                # The kernel ends the conversion processes with the service.
                wait_until(lambda process=process: not process.children(), what="no orphans")
                recovered += sum(line["claims"] for line in process.events("spool_recovered"))
        finally:
            producer.join()
        final = start_process(root, *args).wait_ready()
        claims = instance_folder(root) / "claimed"
        wait_until(
            lambda: not waiting(root / "inbox") and not files_in(claims),
            timeout=90,
            what="an empty inbox and no claims",
        )
        final.send(signal.SIGTERM)
        assert final.wait() == 0
        recovered += sum(line["claims"] for line in final.events("spool_recovered"))
        print(f"claims recovered after the kills: {recovered}")
        assert recovered > 0, "no kill interrupted a conversion: the test proved nothing"

        archived = files_in(root / "archive")
        failed = files_in(root / "failed")
        assert failed == [], failed
        expected = sorted(
            (f"case_{i:04d}.npy" if i % 5 else f"site{i % 3}/case_{i:04d}.npy")
            for i in range(INPUTS)
        )
        assert archived == expected  # no duplicate (a -1 suffix) and none missing
        outputs = files_in(root / "outbox")
        assert outputs == sorted(name[: -len(".npy")] + ".nii.gz" for name in expected)
        for index in range(0, INPUTS, 7):
            relative = expected[[n.endswith(f"case_{index:04d}.npy") for n in expected].index(True)]
            assert np.array_equal(output_of(root, relative), prediction(index, CRASH_SHAPE))
        for name in archived:
            index = int(name[-8:-4])
            assert np.array_equal(np.load(root / "archive" / name), prediction(index, CRASH_SHAPE))
