"""Fortran-order slabs of an output volume, and the tiled copy into them."""

from __future__ import annotations

import numpy as np
import pytest

from niftidrop.slabs import copy_in_tiles, slab_indices


class TestSlabs:
    def test_slab_indices_cover_fortran_order_once(self) -> None:
        """Slabs are consecutive Fortran-order runs that cover every voxel once."""
        shape = (3, 4, 5, 2)
        order = np.arange(int(np.prod(shape))).reshape(shape, order="F")
        seen = np.concatenate(
            [order[index].ravel(order="F") for index in slab_indices(shape, 1, 7)]
        )
        np.testing.assert_array_equal(seen, np.arange(order.size))

    @pytest.mark.parametrize("axes", [(0, 1, 2), (2, 1, 0), (1, 2, 0), (0, 2, 1, 3), (3, 2, 1, 0)])
    def test_tiled_copy_equals_plain_copy(self, axes: tuple[int, ...]) -> None:
        """The cache-tiled transposing copy writes exactly what a plain copy would."""
        shape = (70, 33, 150, 2)[: len(axes)]
        stored = np.random.default_rng(4).random([shape[a] for a in axes]).astype(np.float32)
        values = stored.transpose(np.argsort(axes))
        assert values.shape == shape
        target = np.zeros(shape, np.float64, order="F")
        copy_in_tiles(target, values)
        np.testing.assert_array_equal(target, values)
