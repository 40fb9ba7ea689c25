"""Fixtures shared by every test module."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Swaps its two arguments for ever, as fast as it can: an attacker racing the service.
_FLIPPER = f"""
import ctypes, os, sys
rename = ctypes.CDLL(None, use_errno=True).renameat2
first, second = (os.fsencode(path) for path in sys.argv[1:])
print("flipping", flush=True)
while True:
    rename({_AT_FDCWD}, first, {_AT_FDCWD}, second, {_RENAME_EXCHANGE})
"""


def exchange(first: Path, second: Path) -> None:
    """Swap two names atomically (renameat2 with RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), 2):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first))


@pytest.fixture
def flip_names() -> Iterator[Callable[[Path, Path], Callable[[], None]]]:
    """`flip_names(first, second)` starts a process that exchanges the two names over and
    over (renameat2 RENAME_EXCHANGE) and returns a function that stops it and puts the
    names back; whatever is still flipping at the end of the test is stopped so."""
    stops: list[Callable[[], None]] = []

    def start(first: Path, second: Path) -> Callable[[], None]:
        inode = first.lstat().st_ino
        process = subprocess.Popen(
            [sys.executable, "-c", _FLIPPER, str(first), str(second)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        assert process.stdout.readline() == "flipping\n"

        def stop() -> None:
            if process.returncode is not None:
                return
            process.kill()
            process.wait()
            assert process.stdout is not None
            process.stdout.close()
            if first.lstat().st_ino != inode:
                exchange(first, second)

        stops.append(stop)
        return stop

    yield start
    for stop in stops:
        stop()


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
