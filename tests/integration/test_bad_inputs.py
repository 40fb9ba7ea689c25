"""Bad input battery (README: Error codes, File protocol): every error code from a real file, while
good files keep flowing; hidden and temporary names are left alone."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from support import (
    SHAPE,
    ThreadedService,
    drop_by_rename,
    files_in,
    prediction,
    save_npy,
    write_reference,
)

from waiting import wait_until


def npy_bytes(array: np.ndarray[object, np.dtype[np.generic]], allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npz_with_members(path: Path, members: dict[str, bytes]) -> Path:
    """A zip whose members are given as raw bytes (a valid container, any content)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def huge_header_npy() -> bytes:
    """A .npy header declaring a float64 array of about 80 GB, with 8 bytes of data."""
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (100000, 100000, 1), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 8


def build_battery(staging: Path) -> dict[str, Path]:
    """One staged file per error code (named after it), to be moved into the inbox."""
    files: dict[str, Path] = {}
    good = npy_bytes(prediction(1))

    def staged(name: str, data: bytes) -> Path:
        path = staging / name
        path.write_bytes(data)
        return path

    whole = npy_bytes(prediction(0, shape=(40, 40, 40)))
    files["truncated"] = staged("case_truncated.npy", whole[: len(whole) // 2])
    files["corrupt"] = npz_with_members(staging / "case_corrupt.npz", {"pred.npy": b"not a npy"})
    files["corrupt/text"] = staged("case_text.npy", b"a text file that no writer makes an array")
    objects = np.array([{"a": 1}, None], dtype=object)
    files["unsupported_dtype"] = npz_with_members(
        staging / "case_pickled.npz", {"pred.npy": npy_bytes(objects, allow_pickle=True)}
    )
    pickled = npy_bytes(objects, allow_pickle=True)
    files["unsupported_dtype/pickled_npy"] = staged("case_pickled.npy", pickled)
    structured = np.zeros(SHAPE, dtype=[("x", "<i4"), ("y", "<f4")])
    files["unsupported_dtype/structured"] = staged("case_structured.npy", npy_bytes(structured))
    files["bad_shape"] = staged("case_scalar.npy", npy_bytes(np.array(3.0)))
    files["bad_shape/8d"] = staged("case_8d.npy", npy_bytes(np.zeros((1,) * 8, np.uint8)))
    files["too_large"] = npz_with_members(
        staging / "case_huge.npz", {"pred.npy": huge_header_npy()}
    )
    files["empty_npz"] = npz_with_members(staging / "case_empty.npz", {})
    files["npz_key_missing"] = npz_with_members(staging / "case_nokey.npz", {"other.npy": good})
    overflow = np.full(SHAPE, 1000, dtype=np.int16)
    files["dtype_overflow"] = staged("case_overflow.npy", npy_bytes(overflow))
    files["shape_mismatch"] = staged("case_shape.npy", npy_bytes(np.zeros((3, 3, 3), np.uint8)))
    files["no_reference"] = staged("orphan.npy", good)
    files["ambiguous_reference"] = staged("twin.npy", good)
    files["bad_reference"] = staged("broken.npy", good)
    files["output_conflict"] = staged("conflict.npy", good)
    return files


class TestBadInputs:
    def test_every_error_code_from_a_real_file_while_good_files_flow(
        self, root: Path, start_service: Callable[..., ThreadedService], tmp_path: Path
    ) -> None:
        """Each bad file ends in failed with its code; good files before and after convert."""
        second_library = tmp_path / "library2"
        for folder in (root / "library", second_library):
            write_reference(folder / "twin.nii.gz")
        write_reference(root / "library" / "conflict.nii.gz")
        (root / "library" / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
        (root / "outbox").mkdir()
        (root / "outbox" / "conflict.nii.gz").write_bytes(b"already here")
        staging = tmp_path / "staging"
        staging.mkdir()
        battery = build_battery(staging)
        inbox = root / "inbox"
        outside = tmp_path / "outside.npy"
        save_npy(outside, prediction(5))
        ignored = [".case_hidden.npy", "case_partial.npy.part", "case_download.npy.crdownload"]
        for name in ignored:
            save_npy(inbox / name, prediction(0))

        service = start_service(
            root,
            library=[root / "library", second_library],
            npz_key="pred",
            dtype="uint8",
            on_conflict="fail",
            incomplete_timeout=1.5,
        )
        drop_by_rename(inbox, "case_good_before.npy", prediction(2))
        for path in battery.values():
            path.rename(inbox / path.name)
        (inbox / "case_link.npy").symlink_to(outside)
        drop_by_rename(inbox, "case_good_after.npy", prediction(3))

        expected = {path.name: code.split("/")[0] for code, path in battery.items()}
        expected["case_link.npy"] = "unsafe_input"
        wait_until(
            lambda: len(service.events("input_failed")) == len(expected),
            timeout=60,
            what="every bad file rejected",
        )
        wait_until(lambda: len(service.events("input_converted")) == 2)
        found = {line["input"]: line["error"] for line in service.events("input_failed")}
        assert found == expected
        for name, code in expected.items():
            record = json.loads((root / "failed" / f"{name}.error.json").read_text())
            assert record["error"] == code
            # Every message names the input; reference and output problems that file too.
            named = {"bad_reference": "broken.nii.gz", "output_conflict": "conflict.nii.gz"}
            assert name in record["message"], record
            assert named.get(code, name) in record["message"], record
            assert record["input"] == name
        twin = json.loads((root / "failed" / "twin.npy.error.json").read_text())
        assert len(twin["candidates"]) == 2
        assert json.loads((root / "failed" / "broken.npy.error.json").read_text())["reference"]
        assert sorted(files_in(root / "archive")) == ["case_good_after.npy", "case_good_before.npy"]
        assert outside.is_file()
        assert (root / "failed" / "case_link.npy").is_symlink()
        remaining = sorted(path.name for path in inbox.iterdir() if path.is_file())
        assert remaining == sorted(ignored)
        assert (root / "outbox" / "conflict.nii.gz").read_bytes() == b"already here"
