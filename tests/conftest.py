"""Fixtures shared by every test module."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from niftidrop.settings import ENV_PREFIX


@pytest.fixture(autouse=True)
def _isolated_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each test starts with no NIFTIDROP_* variables and in an empty working folder."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) or name == "NOTIFY_SOCKET":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def make_reference(tmp_path: Path) -> Callable[..., Path]:
    """A factory of reference NIfTI files in the test's folder.

    `make_reference("case.nii.gz", shape=(4, 5, 6), dtype="int16", scaled=True,
    nifti2=False, big_endian=False, qform_code=1)` writes an image whose affine has
    spacing, rotation and translation, so geometry mistakes show; `scaled` stores
    values beyond the dtype's range, so nibabel gives it a `scl_slope`.
    """
    import nibabel as nib
    import numpy as np

    def build(
        name: str = "reference.nii.gz",
        *,
        shape: tuple[int, ...] = (4, 5, 6),
        dtype: str = "int16",
        scaled: bool = False,
        nifti2: bool = False,
        big_endian: bool = False,
        qform_code: int = 1,
        sform_code: int = 2,
    ) -> Path:
        angle = np.deg2rad(10.0)
        affine = np.array(
            [
                [0.9 * np.cos(angle), -1.1 * np.sin(angle), 0.0, -12.5],
                [0.9 * np.sin(angle), 1.1 * np.cos(angle), 0.0, 30.25],
                [0.0, 0.0, 2.5, 7.0],
                [0.0, 0.0, 0.0, 1.0],
            ]
        )
        data = (np.arange(int(np.prod(shape))) % 97).reshape(shape).astype(dtype)
        image_class = nib.Nifti2Image if nifti2 else nib.Nifti1Image
        image = image_class(data * 1000.5 if scaled else data, affine)
        image.set_data_dtype(dtype)
        image.header.set_qform(affine, code=qform_code)
        image.header.set_sform(affine, code=sform_code)
        image.header["cal_max"] = 99
        image.header.set_intent("t test", (12.0,))
        image.header["descrip"] = b"from the scanner"
        path = tmp_path / name
        if big_endian:
            header = image.header.as_byteswapped(">")
            image = image_class(data, None, header=header)
        nib.save(image, path)
        _force_codes(path, qform_code, sform_code)
        return path

    return build


def _force_codes(path: Path, qform_code: int, sform_code: int) -> None:
    """Set the codes in the file itself: nibabel's save turns sform_code 0 into 2."""
    import gzip
    import io

    import nibabel as nib

    compressed = path.name.endswith(".gz")
    raw = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
    # The stored header (a loaded image's header has its scaling and offset reset).
    header = type(nib.load(path).header).from_fileobj(io.BytesIO(raw))
    if (int(header["qform_code"]), int(header["sform_code"])) == (qform_code, sform_code):
        return
    header["qform_code"], header["sform_code"] = qform_code, sform_code
    block = header.binaryblock
    raw = block + raw[len(block) :]
    path.write_bytes(gzip.compress(raw) if compressed else raw)
