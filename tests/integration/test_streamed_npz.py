"""Streamed `.npz` members in the real service (README: Conversion, "Which layouts
stream"): NumPy's labels from a channels-first member, nothing committed for a member
whose CRC-32 fails."""

from __future__ import annotations

import signal
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from support import ServiceProcess, write_reference

from waiting import wait_until

# Large enough for many slabs and released pages, small enough to be quick.
SPATIAL = (96, 80, 64)


def softmax(seed: int) -> np.ndarray:
    """Four float16 channels first, with ties (values in steps of 1/8)."""
    rng = np.random.default_rng(seed)
    values: np.ndarray = (rng.integers(0, 8, (4, *SPATIAL)) / 8).astype(np.float16)
    return values


def damage_crc(path: Path) -> None:
    """Flip one bit of the member's CRC-32, in its local header and the zip directory."""
    with zipfile.ZipFile(path) as archive:
        crc = archive.infolist()[0].CRC ^ 1
    raw = bytearray(path.read_bytes())
    central = raw.rindex(b"PK\x01\x02")
    for at in (14, central + 16):
        raw[at : at + 4] = struct.pack("<L", crc)
    path.write_bytes(bytes(raw))


class TestStreamedMembers:
    def test_argmax_of_a_member_and_a_damaged_one(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """A real service with `channels = "argmax"`: a deflated channels-first member
        gives np.argmax's labels; a stored one whose CRC-32 fails is `corrupt`, with no
        output and no temporary file left in the outbox."""
        write_reference(root / "library" / "big.nii.gz", SPATIAL)
        staging = root / "staging"
        staging.mkdir()
        good = softmax(1)
        np.savez_compressed(staging / "big_good.npz", probabilities=good)
        np.savez(staging / "big_damaged.npz", probabilities=softmax(2))
        damage_crc(staging / "big_damaged.npz")
        service = start_process(root, "--channels", "argmax").wait_ready()
        for name in ("big_damaged.npz", "big_good.npz"):
            (staging / name).rename(root / "inbox" / name)
        wait_until(
            lambda: service.events("input_converted") and service.events("input_failed"),
            60,
            "both inputs finished",
        )
        (failed,) = service.events("input_failed")
        assert (failed["input"], failed["error"]) == ("big_damaged.npz", "corrupt")
        outbox = root / "outbox"
        assert sorted(path.name for path in outbox.iterdir()) == ["big_good.nii.gz"]
        labels = np.asanyarray(nib.load(outbox / "big_good.nii.gz").dataobj)
        np.testing.assert_array_equal(labels, np.argmax(np.moveaxis(good, 0, -1), axis=-1))
        service.send(signal.SIGTERM)
        assert service.wait() == 0
