"""The service benchmark's durable-work limit does the whole job: an output with the
data and geometry niftidrop gives the same input, every input archived once."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from benchmarks import bench_service

from niftidrop.api import convert_file
from niftidrop.settings import Settings


def test_the_limit_writes_what_niftidrop_writes_and_archives_each_input(tmp_path: Path) -> None:
    source = bench_service.build_spool(tmp_path / "source", 3)
    root, staging = bench_service.fresh_root(tmp_path, "limit", source)
    for folder in ("claimed", "outbox", "archive"):
        (root / folder).mkdir()
    names = sorted(path.name for path in staging.iterdir())
    for name in names:
        (staging / name).rename(root / "inbox" / name)

    bench_service.durable_work(str(root), names)

    assert sorted(path.name for path in (root / "archive").iterdir()) == names
    assert not any((root / "inbox").iterdir())
    assert not any((root / "claimed").iterdir())
    settings = Settings.from_values()
    for name in names:
        stem = name.removesuffix(".npy")
        ours = convert_file(
            root / "archive" / name,
            tmp_path / "niftidrop",
            settings=settings,
            reference=root / "library" / f"{stem}.nii.gz",
        )
        expected = nib.load(ours.outputs[0])
        written = nib.load(root / "outbox" / f"{stem}.nii.gz")
        assert written.get_data_dtype() == expected.get_data_dtype()
        assert np.array_equal(np.asarray(written.dataobj), np.asarray(expected.dataobj))
        assert np.array_equal(written.affine, expected.affine)
        assert written.header.get_zooms() == expected.header.get_zooms()
