"""The README's producer examples (README: Python API, `drop`): a PyTorch/MONAI
inference loop and nnU-Net's predictor writing through `drop`, run as written with
plain NumPy stand-ins for torch, the model and nnU-Net, then converted by the real
service (`run --once`) and checked against the scans."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from real_command import niftidrop

README = Path(__file__).resolve().parents[2] / "README.md"
MODEL = "/srv/models/Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres"

# The examples as the README shows them (its "Python API" section).
MONAI_EXAMPLE = """\
import torch
from niftidrop import drop

inbox = "/srv/spool/inbox"
model.eval()
with torch.no_grad():
    for batch in loader:                               # MONAI: batch["image"] is (B, C, x, y, z)
        logits = model(batch["image"].to(device))      # (B, classes, x, y, z)
        label_maps = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
        for case, label_map in zip(batch["case"], label_maps):
            drop(label_map, inbox, f"monai/{case}.npy")  # converted the moment it is there
"""
NNUNET_EXAMPLE = """\
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from niftidrop import drop

model = "/srv/models/Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres"
predictor = nnUNetPredictor()
predictor.initialize_from_trained_model_folder(model, use_folds=(0,))
for case in ("case001", "case002"):
    image, properties = SimpleITKIO().read_images([f"/data/scans/{case}_0000.nii.gz"])
    segmentation = predictor.predict_single_npy_array(image, properties)  # z, y, x
    drop(segmentation, "/srv/spool/inbox", f"nnunet/{case}.npy")
"""
EXAMPLES = (MONAI_EXAMPLE, NNUNET_EXAMPLE)
SCAN_SHAPE = (7, 6, 5)  # x, y, z: no two alike, so a wrong axis order shows
THRESHOLD = 50.0
BASE_FOLDER = re.compile(r"(?<![\w./-])/(?=(?:srv|data)/)")


def rebased(code: str, base: Path) -> str:
    """The example with its /srv and /data folders placed under `base`."""
    return BASE_FOLDER.sub(str(base) + "/", code)


def readme_examples() -> list[str]:
    """The README's Python blocks that write through `drop`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if "from niftidrop import drop" in block]


def write_scan(path: Path, seed: int) -> np.ndarray[Any, Any]:
    """A scan with a rotated, anisotropic affine; its voxels, x, y, z."""
    path.parent.mkdir(parents=True, exist_ok=True)
    voxels = np.random.default_rng(seed).uniform(0, 100, SCAN_SHAPE).astype(np.float32)
    affine = np.array([[0, -1.5, 0, 10], [2.0, 0, 0, -4], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(voxels, affine), path)
    return voxels


class _Tensor:
    """The few torch.Tensor methods the loop calls, on a NumPy array."""

    def __init__(self, values: np.ndarray[Any, Any]) -> None:
        self.values = values

    def to(self, target: Any) -> _Tensor:  # a device, or a dtype
        return self if isinstance(target, str) else _Tensor(self.values.astype(target))

    def argmax(self, dim: int) -> _Tensor:
        return _Tensor(self.values.argmax(axis=dim))

    def cpu(self) -> _Tensor:
        return self

    def numpy(self) -> np.ndarray[Any, Any]:
        return self.values


def torch_stand_in() -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.no_grad = contextlib.nullcontext  # type: ignore[attr-defined]
    torch.uint8 = np.uint8  # type: ignore[attr-defined]
    return torch


class _Model:
    """A 'network': class scores that make the label of a voxel its scan value // 40."""

    def eval(self) -> None:
        pass

    def __call__(self, images: _Tensor) -> _Tensor:
        classes = np.arange(3).reshape(1, 3, 1, 1, 1)
        scores = -np.abs(images.values // 40 - classes)  # (B, 3, x, y, z)
        return _Tensor(scores.astype(np.float32))


def nnunet_stand_in() -> dict[str, types.ModuleType]:
    """nnunetv2's reader (SimpleITK, the real one) and a predictor that thresholds."""

    class SimpleITKIO:
        def read_images(self, paths: list[str]) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
            images = [sitk.GetArrayFromImage(sitk.ReadImage(path)) for path in paths]
            return np.stack(images).astype(np.float32), {"spacing": (3.0, 2.0, 1.5)}

    class nnUNetPredictor:
        def initialize_from_trained_model_folder(self, folder: str, use_folds: Any) -> None:
            assert Path(folder, "dataset.json").is_file()

        def predict_single_npy_array(
            self, image: np.ndarray[Any, Any], properties: dict[str, Any]
        ) -> np.ndarray[Any, Any]:
            return (image[0] > THRESHOLD).astype(np.uint8)  # z, y, x, as nnU-Net returns it

    reader = types.ModuleType("nnunetv2.imageio.simpleitk_reader_writer")
    reader.SimpleITKIO = SimpleITKIO  # type: ignore[attr-defined]
    predictor = types.ModuleType("nnunetv2.inference.predict_from_raw_data")
    predictor.nnUNetPredictor = nnUNetPredictor  # type: ignore[attr-defined]
    return {
        "nnunetv2": types.ModuleType("nnunetv2"),
        "nnunetv2.imageio": types.ModuleType("nnunetv2.imageio"),
        "nnunetv2.imageio.simpleitk_reader_writer": reader,
        "nnunetv2.inference": types.ModuleType("nnunetv2.inference"),
        "nnunetv2.inference.predict_from_raw_data": predictor,
    }


@contextlib.contextmanager
def modules(stand_ins: dict[str, types.ModuleType]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, module in stand_ins.items():
            patch.setitem(sys.modules, name, module)
        yield


def run_once(base: Path, *settings: str) -> None:
    done = niftidrop("run", "--once", "--root", str(base / "srv" / "spool"), *settings)
    assert done.returncode == 0, done.stderr + done.stdout


class TestExamples:
    def test_the_readme_shows_these_examples(self) -> None:
        """The README shows the examples tested here, as written."""
        shown = readme_examples()
        assert [example for example in EXAMPLES if example not in shown] == []

    def test_the_monai_loop(self, tmp_path: Path) -> None:
        """The PyTorch/MONAI loop drops one label map per case; the service converts each
        with its scan's geometry."""
        library = tmp_path / "srv" / "spool" / "library"
        scans = {case: write_scan(library / f"{case}.nii.gz", seed) for seed, case in
                 enumerate(("case001", "case002", "case003"))}  # fmt: skip
        cases = list(scans)
        loader = [
            {"image": _Tensor(np.stack([scans[c][None] for c in cases[:2]])), "case": cases[:2]},
            {"image": _Tensor(scans[cases[2]][None, None]), "case": cases[2:]},
        ]
        namespace = {"model": _Model(), "loader": loader, "device": "cuda:0"}
        with modules({"torch": torch_stand_in()}):
            exec(rebased(MONAI_EXAMPLE, tmp_path), namespace)
        run_once(tmp_path)
        for case, scan in scans.items():
            output = nib.load(tmp_path / "srv" / "spool" / "outbox" / "monai" / f"{case}.nii.gz")
            np.testing.assert_array_equal(np.asarray(output.dataobj), scan // 40)
            np.testing.assert_allclose(output.affine, nib.load(library / f"{case}.nii.gz").affine)

    def test_the_nnunet_predictor(self, tmp_path: Path) -> None:
        """nnU-Net's predictor drops z, y, x segmentations; with axis_order = "zyx" and the
        model's dataset.json as labels, each output is the scan's own label map in x, y, z,
        a label map (intent 1002) with its dseg.tsv."""
        model = Path(rebased(MODEL, tmp_path))
        model.mkdir(parents=True)
        (model / "dataset.json").write_text(
            json.dumps({"labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"})
        )
        scans = tmp_path / "data" / "scans"
        voxels = {case: write_scan(scans / f"{case}_0000.nii.gz", seed)
                  for seed, case in enumerate(("case001", "case002"))}  # fmt: skip
        with modules(nnunet_stand_in()):
            exec(rebased(NNUNET_EXAMPLE, tmp_path), {})
        labels = str(model / "dataset.json")
        run_once(tmp_path, "--library", str(scans), "--axis-order", "zyx", "--labels", labels)
        outbox = tmp_path / "srv" / "spool" / "outbox" / "nnunet"
        for case, scan in voxels.items():
            output = nib.load(outbox / f"{case}.nii.gz")
            np.testing.assert_array_equal(np.asarray(output.dataobj), scan > THRESHOLD)
            assert int(output.header["intent_code"]) == 1002
            assert (
                outbox / f"{case}.dseg.tsv"
            ).read_text() == "index\tname\n0\tbackground\n1\tliver\n"
