"""Fortran-order slabs of an output volume, and the blocked copy into them."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from niftidrop import slabs
from niftidrop.slabs import copy_in_blocks, slab_indices


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
    def test_blocked_copy_equals_plain_copy(self, axes: tuple[int, ...]) -> None:
        """The transposing copy through blocks writes exactly what a plain copy would."""
        shape = (70, 33, 150, 2)[: len(axes)]
        stored = np.random.default_rng(4).random([shape[a] for a in axes]).astype(np.float32)
        values = stored.transpose(np.argsort(axes))
        assert values.shape == shape
        target = np.zeros(shape, np.float64, order="F")
        copy_in_blocks(target, values)
        np.testing.assert_array_equal(target, values)

    @settings(max_examples=60, deadline=None)
    @given(
        shape=st.lists(st.integers(1, 70), min_size=2, max_size=3),
        channels=st.integers(0, 3),
        order=st.randoms(use_true_random=False),
        source=st.sampled_from(["u1", "i2", "f2", "f4", "i8", "f8", "c8", "c16"]),
        target=st.sampled_from(["u1", "i2", "f4", "f8", "c16"]),
        reversed_axis=st.integers(-1, 3),
        block_bytes=st.sampled_from([8, 100, 4096, slabs.BLOCK_BYTES]),
    )
    def test_every_layout_and_item_size_copies_exactly(
        self,
        *,
        shape: list[int],
        channels: int,
        order: random.Random,
        source: str,
        target: str,
        reversed_axis: int,
        block_bytes: int,
    ) -> None:
        """Any axis order (one axis perhaps reversed), any item size and cast, blocks
        of any size (smaller than a value, or than a run along the source's fastest
        axis, too): the blocked copy writes what a plain copy writes."""
        assume(source.startswith("c") <= target.startswith("c"))  # no complex to real
        shape = [*shape, channels] if channels else shape
        axes = list(range(len(shape)))
        order.shuffle(axes)
        rng = np.random.default_rng(len(shape))
        stored = (rng.random([shape[a] for a in axes]) * 100).astype(source)
        values = stored.transpose(np.argsort(axes))
        if 0 <= reversed_axis < len(shape):
            values = np.flip(values, axis=reversed_axis)
        want = np.zeros(values.shape, target, order="F")
        np.copyto(want, values, casting="unsafe")
        got = np.zeros(values.shape, target, order="F")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(slabs, "BLOCK_BYTES", block_bytes)
            patch.setattr(slabs, "PLAIN_COPY_VALUES", 0)
            copy_in_blocks(got, values)
        np.testing.assert_array_equal(got, want)
