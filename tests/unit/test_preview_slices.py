"""What a preview reads: the prediction's centre (two ways) and three reference slices."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import niftidrop.preview_slices
from niftidrop.arrays import open_input
from niftidrop.conversion import plan_conversion
from niftidrop.preview_slices import (
    OutputWatch,
    Prediction,
    cut,
    occupied_centre,
    prediction_of,
    reference_slices,
    volume_centre,
    watch_output,
)


def expected_centre(data: np.ndarray) -> tuple[int, int, int] | None:
    """The definition, by brute force: per axis, the mean index of the slices with a
    non-zero voxel."""
    nonzero = data != 0
    if not nonzero.any():
        return None
    middles = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        middles.append(round(float(np.flatnonzero(nonzero.any(axis=others)).mean())))
    return (middles[0], middles[1], middles[2])


def through_watch(data: np.ndarray, chunk_voxels: int) -> OutputWatch:
    """`data` as a writer would see it: a header, then Fortran-order chunks."""
    watch = OutputWatch((data.shape[0], data.shape[1], data.shape[2]), data.dtype)
    flat = data.reshape(-1, order="F")
    chunks = [b"header"] + [
        flat[start : start + chunk_voxels].tobytes() for start in range(0, flat.size, chunk_voxels)
    ]
    assert list(watch.watch(chunks)) == chunks
    return watch


class TestCentre:
    @hypothesis_settings(max_examples=150, deadline=None)
    @given(
        data=hnp.arrays(
            dtype=st.sampled_from([np.uint8, np.int16, np.float32, np.bool_]),
            shape=hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=7),
        ),
        chunk=st.integers(min_value=1, max_value=60),
        fortran=st.booleans(),
    )
    def test_both_ways_agree_with_the_definition(
        self, data: np.ndarray, chunk: int, fortran: bool
    ) -> None:
        """For any dtype, shape, memory order and chunking, the pass after the conversion
        and the watch during it find the same centre as the definition."""
        data = np.nan_to_num(data)
        data = np.asfortranarray(data) if fortran else np.ascontiguousarray(data)
        want = expected_centre(data)
        assert occupied_centre(Prediction((data,), labels=True)) == want
        assert through_watch(data, chunk).centre() == want

    def test_negative_zero_is_zero(self) -> None:
        """-0.0 is not part of the prediction, for both ways."""
        data = np.full((3, 3, 3), -0.0, np.float32)
        assert occupied_centre(Prediction((data,), labels=False)) is None
        assert through_watch(data, 5).centre() is None

    def test_a_stray_voxel_moves_the_centre_little(self) -> None:
        """One voxel far from a 20-slice structure moves the centre by about one slice."""
        data = np.zeros((60, 4, 4), np.uint8)
        data[10:30] = 1
        data[59, 0, 0] = 1
        centre = occupied_centre(Prediction((data,), labels=True))
        assert centre is not None
        assert centre[0] == 21  # the bounding box's centre would be 34

    def test_a_watch_that_missed_voxels_refuses_to_answer(self) -> None:
        """An output not written again (a redo's) has no watched centre."""
        watch = OutputWatch((2, 2, 2), np.dtype(np.uint8))
        with pytest.raises(ValueError, match="saw 0 voxels of 8"):
            watch.centre()

    def test_the_header_is_passed_on_unread(self) -> None:
        """The first chunk (the NIfTI header) is not taken for voxels."""
        watch = OutputWatch((1, 1, 1), np.dtype(np.uint8))
        chunks = [b"\x00" * 352, b"\x01"]
        assert list(watch.watch(chunks)) == chunks
        assert watch.centre() == (0, 0, 0)

    def test_release_is_called_per_block(self) -> None:
        """The pages of the input are released as the pass goes."""
        calls: list[int] = []
        data = np.ones((4, 4, 4), np.uint8)
        occupied_centre(Prediction((data,), labels=True), lambda: calls.append(1))
        assert calls

    def test_argmax_of_channels(self) -> None:
        """Several channels: the centre of where a channel other than the first wins."""
        scores = np.zeros((8, 8, 8, 2), np.float32)
        scores[..., 0] = 0.5
        scores[1:3, 1:3, 1:3, 1] = 1.0
        prediction = Prediction((scores[..., 0], scores[..., 1]), labels=True)
        assert occupied_centre(prediction) == (2, 2, 2)
        assert volume_centre((8, 8, 8)) == (4, 4, 4)


class TestPrediction:
    @pytest.mark.parametrize(
        ("channels", "count", "watched"),
        [("keep", 3, False), ("argmax", 3, True), ("split", 3, False), ("vector", 3, False)],
    )
    def test_channels_of_each_mode(
        self, tmp_path: Path, channels: Any, count: int, watched: bool
    ) -> None:
        """Every channel mode gives the preview the same channels, as x, y, z views;
        only a one-volume 3-D output is watched as it is written."""
        path = tmp_path / "scores.npy"
        scores = np.random.default_rng(0).random((4, 5, 6, 3)).astype(np.float32)
        np.save(path, scores)
        plan = plan_conversion(
            open_input(path, npz_key=None, max_input_bytes=2**30), None, channels=channels
        )
        prediction = prediction_of(plan.volumes)
        assert (len(prediction.channels), prediction.labels) == (count, True)
        assert prediction.shape == (4, 5, 6)
        assert np.array_equal(
            prediction.values((0, slice(None), slice(None))), np.argmax(scores[0], axis=-1)
        )
        assert (watch_output(plan) is not None) == watched

    def test_one_float_volume_is_a_heat_map(self, tmp_path: Path) -> None:
        """A 3-D float output is shown as a heat map, an integer one as labels."""
        for dtype, labels in ((np.float32, False), (np.int16, True), (np.bool_, True)):
            path = tmp_path / "case.npy"
            np.save(path, np.zeros((2, 3, 4), dtype))
            plan = plan_conversion(open_input(path, npz_key=None, max_input_bytes=2**30), None)
            assert prediction_of(plan.volumes).labels is labels

    def test_cut_takes_the_three_planes(self) -> None:
        """cut: fixed x, then y, then z."""
        data = np.arange(24).reshape(2, 3, 4)
        sagittal, coronal, axial = cut(lambda index: data[index], (1, 2, 3))
        assert np.array_equal(sagittal, data[1])
        assert np.array_equal(coronal, data[:, 2])
        assert np.array_equal(axial, data[:, :, 3])


class TestReferenceSlices:
    @pytest.mark.parametrize("name", ["ref.nii", "ref.nii.gz"])
    @pytest.mark.parametrize("shape", [(7, 6, 5), (7, 6, 5, 2)])
    def test_the_slices_are_the_voxels(
        self, tmp_path: Path, name: str, shape: tuple[int, ...]
    ) -> None:
        """Memory-mapped or streamed, 3-D or 4-D (its first volume), scaled: the slices
        are those of the whole image read by nibabel."""
        values = np.random.default_rng(1).integers(-500, 500, shape).astype(np.int16)
        image = nib.Nifti1Image(values, np.eye(4))
        image.header.set_slope_inter(2.0, -3.0)
        path = tmp_path / name
        nib.save(image, path)
        whole = np.asanyarray(nib.load(path).dataobj)
        whole = whole[..., 0] if whole.ndim == 4 else whole
        got = reference_slices(path, (3, 2, 4))
        for part, want in zip(got, cut(lambda index: whole[index], (3, 2, 4)), strict=True):
            assert part.dtype == np.float32
            assert np.allclose(part, want)

    def test_planes_are_streamed_in_blocks(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A `.nii.gz` read in blocks of a few planes gives the same slices."""
        monkeypatch.setattr(niftidrop.preview_slices, "BLOCK_BYTES", 7 * 6 * 2 * 2)
        values = np.arange(7 * 6 * 5, dtype=np.int16).reshape(7, 6, 5)
        path = tmp_path / "ref.nii.gz"
        nib.save(nib.Nifti1Image(values, np.eye(4)), path)
        got = reference_slices(path, (6, 0, 4))
        assert np.array_equal(got[0], values[6])
        assert np.array_equal(got[2], values[:, :, 4])

    def test_a_short_file_is_an_error(self, tmp_path: Path) -> None:
        """A compressed reference that ends early raises (the preview reports it)."""
        values = np.ones((7, 6, 5), np.int16)
        path = tmp_path / "ref.nii.gz"
        nib.save(nib.Nifti1Image(values, np.eye(4)), path)
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
        with pytest.raises(EOFError, match="expected 5 planes"):
            reference_slices(path, (1, 1, 1))
