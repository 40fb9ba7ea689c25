"""The running argmax over channels: NumPy's answers, ties and NaN included."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from niftidrop.argmax import (
    MAX_RUNNING_CHANNELS,
    RunningArgmax,
    argmax_last,
    channels_come_last_in_file,
    index_dtype,
    keys,
    uses_running,
)

FLOATS = ["<f2", ">f2", "<f4", ">f4", "<f8", ">f8"]
INTEGERS = ["|i1", "|u1", "<i2", ">u2", "<i4", "<u4", "<i8", ">i8", "<u8"]
# Few distinct values, so that ties are common; the float specials NumPy orders.
FLOAT_VALUES = [0.0, -0.0, 1.0, -1.0, 0.5, np.inf, -np.inf, np.nan, -np.nan, 65504.0, 1e-7]


def values_of(dtype: np.dtype[Any]) -> st.SearchStrategy[Any]:
    """Elements of `dtype` with many ties (and every float special)."""
    if dtype.kind == "b":
        return st.booleans()
    if dtype.kind == "f":
        return st.sampled_from(FLOAT_VALUES)
    if dtype.kind == "c":
        parts = st.sampled_from([0.0, 1.0, -1.0, np.nan])
        return st.builds(complex, parts, parts)
    info = np.iinfo(dtype)
    return st.sampled_from([int(info.min), -1 if info.min else 0, 0, 1, 2, int(info.max)])


@st.composite
def channel_arrays(draw: st.DrawFn) -> np.ndarray:
    """Small arrays of every dtype, channels last, in a random memory layout."""
    dtype = np.dtype(draw(st.sampled_from(["|b1", *FLOATS, *INTEGERS, "<c8", ">c16"])))
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6))
    array = draw(hnp.arrays(dtype, shape, elements=values_of(dtype)))
    # The same values laid out with the channel axis anywhere in memory.
    order = draw(st.permutations(range(array.ndim)))
    stored = np.ascontiguousarray(array.transpose(order))
    result: np.ndarray = stored.transpose(np.argsort(order))
    return result


class TestSameAsNumpy:
    @given(channel_arrays())
    def test_argmax_last_is_numpys_argmax(self, values: np.ndarray) -> None:
        """For every dtype and layout, the running argmax gives np.argmax's answer
        (first maximum on ties, first NaN wins, -0.0 equals 0.0)."""
        np.testing.assert_array_equal(argmax_last(values), np.argmax(values, axis=-1))

    @given(channel_arrays(), st.data())
    def test_updates_in_pieces_are_one_update(
        self, values: np.ndarray, data: st.DataObject
    ) -> None:
        """Channels taken piece by piece (any cut along one axis) give the same labels."""
        if not uses_running(values):
            return
        spatial = values[..., 0]
        axis = data.draw(st.integers(0, spatial.ndim - 1))
        cut = data.draw(st.integers(1, max(1, spatial.shape[axis])))
        running = RunningArgmax(spatial, values.shape[-1])
        for channel in range(values.shape[-1]):
            for start in range(0, spatial.shape[axis], cut):
                where = (slice(None),) * axis + (slice(start, start + cut),)
                running.update(channel, values[..., channel][where], where)
        np.testing.assert_array_equal(running.index, np.argmax(values, axis=-1))

    @given(st.sampled_from(FLOATS), st.lists(st.sampled_from(FLOAT_VALUES), min_size=2))
    def test_float_keys_order_as_argmax_does(self, dtype: str, items: list[float]) -> None:
        """Float keys compare as NumPy's argmax compares the floats (NaN largest)."""
        values = np.array(items, dtype=dtype)
        assert np.argmax(keys(values)) == np.argmax(values)


class TestChoices:
    def test_index_is_the_narrowest_unsigned_integer(self) -> None:
        """The running index takes one byte up to 256 channels, two up to 65,536."""
        assert [index_dtype(n).str for n in (2, 256, 257, 65_536, 65_537)] == [
            "|u1",
            "|u1",
            "<u2",
            "<u2",
            "<u4",
        ]

    def test_numpy_keeps_complex_and_many_channels(self) -> None:
        """Complex values, one channel and very many channels go to np.argmax."""
        assert not uses_running(np.zeros((3, 4), np.complex64))
        assert not uses_running(np.zeros((3, 1), np.float32))
        assert not uses_running(np.zeros((3, MAX_RUNNING_CHANNELS + 1), np.float32))
        assert uses_running(np.zeros((3, 4), np.float16))

    @pytest.mark.parametrize(
        ("first", "expected"), [(True, True), (False, False)], ids=["channels first", "last"]
    )
    def test_channels_first_lie_last_in_file(self, first: bool, expected: bool) -> None:
        """A channels-first array, moved last, has its channel axis slowest in memory."""
        stored = np.zeros((4, 5, 6, 7) if first else (5, 6, 7, 4), np.float32)
        view = np.moveaxis(stored, 0, -1) if first else stored
        assert channels_come_last_in_file(view) is expected
