"""The pixel work of a preview: Pillow's nearest neighbours, numpy's percentiles, the PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from niftidrop.preview_pixels import nearest, nearest_indices, png_bytes, sorted_percentiles


class TestNearest:
    @given(st.integers(1, 700), st.integers(1, 300))
    def test_nearest_indices_are_pillows(self, count: int, size: int) -> None:
        """Any source and target length: the pixels picked are those Pillow's
        nearest-neighbour resize picks."""
        line = Image.fromarray(np.arange(count, dtype=np.int32)[None, :], mode="I")
        want = np.asarray(line.resize((size, 1), resample=Image.Resampling.NEAREST))[0]
        assert nearest_indices(count, size).tolist() == want.tolist()

    @pytest.mark.parametrize("step", [1, 3, 100])
    def test_strided_slices_are_resampled_as_pillow_resamples(self, step: int) -> None:
        """A slice whose voxels lie 1, 3 or 100 bytes apart (each read by its own
        path), flipped as panels are: resampled as Pillow resamples it."""
        volume = np.random.default_rng(step).integers(0, 250, (37, 41 * step), dtype=np.uint8)
        values = volume[:, ::step].T[::-1, ::-1]
        image = Image.fromarray(np.ascontiguousarray(values, dtype=np.int32), mode="I")
        for size in ((13, 90), (41, 37), (200, 7)):
            want = np.asarray(image.resize(size, resample=Image.Resampling.NEAREST))
            assert np.array_equal(nearest(values, size), want)


class TestPercentiles:
    @given(
        hnp.arrays(
            np.float32,
            st.integers(1, 3000),
            elements=st.floats(-1e6, 1e6, width=32) | st.sampled_from([0.0, 1.0, 7.5]),
        )
    )
    def test_sorted_percentiles_are_numpys(self, values: np.ndarray) -> None:
        """Any finite float32 values: the 1st and 99th percentiles bit for bit as
        np.percentile gives them."""
        want = np.percentile(values, [1.0, 99.0])
        assert sorted_percentiles(np.sort(values), (1.0, 99.0)) == (want[0], want[1])


class TestPng:
    @given(
        hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)).map(
            lambda plane: np.stack([plane, plane[::-1], 255 - plane], axis=-1)
        )
    )
    def test_png_bytes_read_back_as_the_pixels(self, rgb: np.ndarray) -> None:
        """Any RGB image written by png_bytes reads back, with Pillow, pixel for pixel."""
        with Image.open(io.BytesIO(png_bytes(rgb))) as image:
            assert image.mode == "RGB"
            assert np.array_equal(np.asarray(image), rgb)
