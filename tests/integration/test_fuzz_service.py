"""Service-level fuzz (README: File protocol): hundreds of damaged inputs dropped into a
running service among good ones, with special files beside them. The service never
exits, every regular file ends in archive or failed exactly once, every good one is
converted, and the special files are left where they are, reported once each."""

from __future__ import annotations

import os
import random
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from support import SHAPE, ThreadedService, drop_by_rename, prediction

import fuzzing
from waiting import wait_until

DAMAGED = 300
GOOD = 30


def damaged_files(seed: int, count: int) -> list[tuple[str, bytes]]:
    """Valid inputs (fitting the reference, or not) with 1 to 4 mutations each."""
    rng = random.Random(seed)
    files = []
    for number in range(count):
        shape = rng.choice([SHAPE, (*SHAPE, 2), (2, *SHAPE), (3, 3)])
        arrays = [fuzzing.array_of(shape, rng.choice(fuzzing.DTYPES), number)]
        if rng.random() < 0.5:
            name, content = f"case_bad{number}.npy", fuzzing.npy_bytes(arrays[0])
        else:
            arrays += [np.zeros(3)] * rng.randrange(2)
            content = fuzzing.npz_bytes(arrays, compressed=rng.random() < 0.5)
            name = f"case_bad{number}.npz"
        operations = [
            (rng.randrange(7), rng.randrange(1 << 20), rng.randrange(1 << 20))
            for _ in range(rng.randint(1, 4))
        ]
        files.append((name, fuzzing.mutate(content, operations)))
    return files


def drop_bytes(inbox: Path, name: str, content: bytes) -> None:
    temporary = inbox / f".{name}.tmp"
    temporary.write_bytes(content)
    temporary.rename(inbox / name)


def landed(folder: Path) -> Counter[str]:
    """Input names in archive or failed (suffixed copies counted under their own name).

    Hidden names are the service's temporaries (an error record being written), not
    inputs: counting them would end the wait before the last input has landed."""
    return Counter(
        path.name
        for path in folder.rglob("*")
        if path.is_file()
        and not path.name.endswith(".error.json")
        and not path.name.startswith(".")
    )


class TestServiceFuzz:
    def test_damaged_inputs_among_good_ones(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """300 damaged files, 30 good ones, a FIFO, a socket and a folder named x.npy."""
        inbox = root / "inbox"
        os.mkfifo(inbox / "case_fifo.npy")
        (inbox / "case_folder.npy").mkdir()
        with socket.socket(socket.AF_UNIX) as listening:
            listening.bind(str(inbox / "case_socket.npz"))
            service = start_service(root, incomplete_timeout=1.0, rescan_interval=0.5)
            good = {f"case_good{number}.npy" for number in range(GOOD)}
            damaged = damaged_files(seed=9, count=DAMAGED)
            for number, (name, content) in enumerate(damaged):
                drop_bytes(inbox, name, content)
                if number % (DAMAGED // GOOD) == 0:
                    drop_by_rename(
                        inbox, f"case_good{number // (DAMAGED // GOOD)}.npy", prediction(number)
                    )
            names = {name for name, _ in damaged} | good

            def settled() -> bool:
                assert service.thread.is_alive(), "the service stopped"
                return sum((landed(root / "archive") + landed(root / "failed")).values()) >= len(
                    names
                )

            wait_until(settled, timeout=90, what="every input in archive or failed")
            archived, failed = landed(root / "archive"), landed(root / "failed")
            assert set(archived) | set(failed) == names  # nothing else, nothing missing
            assert set(archived) & set(failed) == set()  # exactly once...
            assert max((archived + failed).values()) == 1  # ...and no suffixed copy
            assert good <= set(archived)
            for name in good:
                assert (root / "outbox" / name.replace(".npy", ".nii.gz")).is_file()
            for record in service.events("input_failed"):
                assert record["error"] in {
                    "truncated",
                    "corrupt",
                    "unsupported_dtype",
                    "bad_shape",
                    "shape_mismatch",
                    "too_large",
                    "empty_npz",
                }, record
            wait_until(lambda: len(service.events("input_ignored")) >= 2, timeout=10)
            assert service.stop() == 0
        # Rescanned every 0.5 s, yet reported once; a folder is a folder, never an input.
        ignored = Counter(record["input"] for record in service.events("input_ignored"))
        assert ignored == {"case_fifo.npy": 1, "case_socket.npz": 1}
        assert sorted(path.name for path in inbox.iterdir() if not path.name.startswith(".")) == [
            "case_fifo.npy",
            "case_folder.npy",
            "case_socket.npz",
        ]
