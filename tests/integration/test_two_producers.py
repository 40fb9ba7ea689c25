"""Profiles in the running service (README: Configuration, Profiles): two producers
that write differently, in two subfolders of one inbox, each converted exactly by
its own profile, with its own library; the profile in the log line and the sidecar."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np
from support import ThreadedService, write_reference

from waiting import wait_until

SCAN = (6, 5, 4)  # x, y, z of every reference
NNUNET: dict[str, Any] = {
    "name": "nnunet",
    "match": "nnunet/**",
    "library": ["nnunet_images"],
    "npz_key": "probabilities",
    "axis_order": "zyx",
    "channels": "argmax",
}
MONAI: dict[str, Any] = {"name": "monai", "match": "monai/**"}


def scores(seed: int) -> np.ndarray[Any, Any]:
    """Softmax-like class scores (C, X, Y, Z), float32, different per seed."""
    return np.random.default_rng(seed).random((3, *SCAN)).astype(np.float32)


def drop(inbox: Path, relative: str, write: Callable[[BinaryIO], object]) -> None:
    """Write with `write` under a hidden name in the inbox, then rename it in."""
    final = inbox / relative
    final.parent.mkdir(parents=True, exist_ok=True)
    hidden = final.with_name(f".{final.name}.tmp")
    with hidden.open("wb") as file:
        write(file)
    hidden.rename(final)


def voxels(path: Path) -> np.ndarray[Any, Any]:
    return np.asanyarray(nib.load(path).dataobj)


class TestTwoProducers:
    def test_each_subfolder_converts_by_its_profile(
        self, tmp_path: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """nnU-Net's (C, Z, Y, X) `.npz` becomes the argmax label map on its `_0000`
        image from the nnunet profile's library, MONAI's (C, X, Y, Z) `.npy` a 4-D
        float32 image on the top-level library's scan (the same case name exists in
        both libraries); each value is exact; `input_converted` and the sidecar
        name the profile and the settings used; an input outside both profiles
        converts with the top-level settings and profile null."""
        nnunet_image = write_reference(tmp_path / "nnunet_images" / "case1_0000.nii.gz")
        monai_scan = write_reference(tmp_path / "library" / "case1.nii.gz")
        write_reference(tmp_path / "library" / "case1_0000.nii.gz")  # not nnunet's folder
        (tmp_path / "inbox").mkdir()
        service = start_service(tmp_path, sidecar=True, profiles=[NNUNET, MONAI])
        nnunet, monai = scores(1), scores(2)
        zyx = np.ascontiguousarray(nnunet.transpose(0, 3, 2, 1))
        inbox = tmp_path / "inbox"
        drop(inbox, "nnunet/case1.npz", lambda file: np.savez(file, probabilities=zyx))
        drop(inbox, "monai/case1.npy", lambda file: np.save(file, monai))
        drop(inbox, "case1.npy", lambda file: np.save(file, monai[0]))
        wait_until(lambda: len(service.events("input_converted")) == 3, 60, "3 conversions")
        assert service.events("input_failed") == []

        labels = voxels(tmp_path / "outbox" / "nnunet" / "case1.nii.gz")
        assert labels.dtype == np.uint8
        assert np.array_equal(labels, np.argmax(nnunet, axis=0))
        kept = voxels(tmp_path / "outbox" / "monai" / "case1.nii.gz")
        assert kept.dtype == np.float32
        assert np.array_equal(kept, np.moveaxis(monai, 0, -1))
        assert np.array_equal(voxels(tmp_path / "outbox" / "case1.nii.gz"), monai[0])

        lines = {line["input"]: line for line in service.events("input_converted")}
        assert lines["nnunet/case1.npz"]["profile"] == "nnunet"
        assert lines["nnunet/case1.npz"]["reference"] == str(nnunet_image)
        assert lines["nnunet/case1.npz"]["rule"] == "input_prefix"
        assert lines["monai/case1.npy"]["profile"] == "monai"
        assert lines["monai/case1.npy"]["reference"] == str(monai_scan)
        assert lines["case1.npy"]["profile"] is None
        assert lines["case1.npy"]["reference"] == str(monai_scan)

        sidecar = json.loads((tmp_path / "outbox" / "nnunet" / "case1.json").read_text())
        assert sidecar["profile"] == "nnunet"
        used = {key: NNUNET[key] for key in ("axis_order", "channels", "npz_key")}
        assert sidecar["settings"] == {**used, "dtype": "auto"}
        top = json.loads((tmp_path / "outbox" / "case1.json").read_text())
        assert (top["profile"], top["settings"]["axis_order"]) == (None, "xyz")
        assert (tmp_path / "archive" / "nnunet" / "case1.npz").is_file()

    def test_a_reference_added_to_a_profile_library_is_found(
        self, tmp_path: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """The service watches the profile's library like the top level's: an input
        waiting (reference_wait) for its reference there converts once it appears."""
        (tmp_path / "nnunet_images").mkdir()
        (tmp_path / "library").mkdir()
        (tmp_path / "inbox").mkdir()
        profile = {**NNUNET, "reference_wait": 30}
        service = start_service(tmp_path, profiles=[profile])
        zyx = np.ascontiguousarray(scores(3).transpose(0, 3, 2, 1))
        drop(tmp_path / "inbox", "nnunet/case9.npz", lambda file: np.savez(file, probabilities=zyx))
        claimed = lambda: not (tmp_path / "inbox" / "nnunet" / "case9.npz").exists()  # noqa: E731
        wait_until(claimed, 30, "the input claimed")
        assert service.events("input_converted") == []
        image = write_reference(tmp_path / "nnunet_images" / "case9_0000.nii.gz")
        wait_until(lambda: len(service.events("input_converted")) == 1, 60, "the conversion")
        (line,) = service.events("input_converted")
        assert (line["profile"], line["reference"]) == ("nnunet", str(image))
