"""Tests of label names (README: Conversion, labels): the table in either direction,
nnU-Net's dataset.json, the dseg.tsv text and the values a label map holds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from niftidrop.labels import LabelCensus, dseg_text, label_table, parse_labels

# The labels of nnU-Net v2's Dataset003_Liver dataset.json.
NNUNET_LIVER = {"background": 0, "liver": 1, "cancer": 2}
# A region-based dataset.json (BraTS in nnU-Net v2): regions, and the value each is written as.
NNUNET_BRATS = {
    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": [3]},
    "regions_class_order": [1, 2, 3],
}


def write_dataset_json(folder: Path, document: object) -> Path:
    path = folder / "dataset.json"
    path.write_text(json.dumps(document))
    return path


class TestTables:
    def test_a_toml_table_names_values(self) -> None:
        """`{1 = "liver", 2 = "tumour"}` as TOML gives it (string keys) is value → name."""
        assert parse_labels({"1": "liver", "2": "tumour"}) == {1: "liver", 2: "tumour"}

    def test_whole_number_keys_are_taken_as_they_are(self) -> None:
        """A table built in Python may use int keys."""
        assert parse_labels({2: "tumour", 1: "liver"}) == {1: "liver", 2: "tumour"}

    def test_names_to_values_is_read_the_other_way_round(self) -> None:
        """nnU-Net's direction, name → value, gives the same value → name table."""
        assert parse_labels(NNUNET_LIVER) == {0: "background", 1: "liver", 2: "cancer"}

    def test_json_text_is_a_table(self) -> None:
        """From a flag or the environment: the table as JSON, in either direction."""
        assert parse_labels('{"1": "liver"}') == {1: "liver"}
        assert parse_labels(' {"liver": 1}') == {1: "liver"}

    def test_no_labels_is_none(self) -> None:
        """The default: no label names."""
        assert parse_labels(None) is None

    @pytest.mark.parametrize(
        ("table", "reason"),
        [
            ({"one": "liver"}, "label value 'one' is not a whole number"),
            ({"1.5": "liver"}, "label value '1.5' is not a whole number"),
            ({"-1": "liver"}, "label value -1 is below 0"),
            ({"1": "liver", "tumour": 2}, "neither all names nor all whole numbers"),
            ({"liver": 1.5}, "neither all names nor all whole numbers"),
            ({"liver": True}, "neither all names nor all whole numbers"),
            ({"liver": 1, "tumour": 1}, "value 1 is named twice ('liver', 'tumour')"),
            ({"1": "liver", "01": "tumour"}, "value 1 is named twice"),
            ({"1": "liver\tleft"}, "expected text on one line"),
            ({"1": " "}, "expected text on one line"),
            ({}, "the table is empty"),
        ],
    )
    def test_a_bad_table_says_what_is_wrong(self, table: dict[str, object], reason: str) -> None:
        """Each problem is a ValueError whose words name the entry."""
        with pytest.raises(ValueError, match=re.escape(reason)):
            label_table(table)


class TestDatasetJson:
    def test_its_labels_map_is_used(self, tmp_path: Path) -> None:
        """The path of an nnU-Net dataset.json gives its labels, value → name."""
        path = write_dataset_json(tmp_path, {"name": "Liver", "labels": NNUNET_LIVER})
        assert parse_labels(str(path)) == {0: "background", 1: "liver", 2: "cancer"}

    def test_a_path_object_is_a_path_too(self, tmp_path: Path) -> None:
        """`Path` values (from Python) are read like strings."""
        path = write_dataset_json(tmp_path, {"labels": {"1": "liver"}})
        assert parse_labels(path) == {1: "liver"}

    def test_regions_are_the_values_nnunet_writes_for_them(self, tmp_path: Path) -> None:
        """Region labels: the k-th region is written as the k-th of regions_class_order."""
        path = write_dataset_json(tmp_path, NNUNET_BRATS)
        assert parse_labels(str(path)) == {
            0: "background",
            1: "whole tumor",
            2: "tumor core",
            3: "enhancing",
        }

    def test_a_region_of_one_value_needs_no_order(self) -> None:
        """Without regions_class_order a one-value list is that value."""
        assert label_table({"background": 0, "liver": [1]}) == {0: "background", 1: "liver"}

    def test_a_region_of_several_values_needs_the_order(self) -> None:
        """Without regions_class_order, which value a region is written as is unknown."""
        with pytest.raises(ValueError, match="expected regions_class_order"):
            label_table({"background": 0, "tumour": [1, 2]})

    def test_an_order_of_the_wrong_length_is_refused(self) -> None:
        """regions_class_order must give one value per label after the background."""
        with pytest.raises(ValueError, match="one value for each of the 3 labels"):
            label_table(NNUNET_BRATS["labels"], regions_class_order=[1, 2])  # type: ignore[arg-type]

    def test_a_missing_file_is_named(self, tmp_path: Path) -> None:
        """A dataset.json that is not there: its path in the message."""
        with pytest.raises(ValueError, match=r"dataset\.json does not exist"):
            parse_labels(str(tmp_path / "dataset.json"))

    def test_a_file_that_is_not_json_is_named(self, tmp_path: Path) -> None:
        """Bad JSON: the path and where the parser stopped."""
        path = tmp_path / "dataset.json"
        path.write_text('{"labels": {"liver": 1')
        with pytest.raises(ValueError, match=r"dataset\.json is not JSON: Expecting"):
            parse_labels(str(path))

    def test_a_file_without_labels_is_named(self, tmp_path: Path) -> None:
        """JSON without a labels table (not an nnU-Net dataset.json)."""
        path = write_dataset_json(tmp_path, {"name": "Liver"})
        with pytest.raises(ValueError, match="has no labels table"):
            parse_labels(str(path))

    def test_a_bad_entry_names_the_file(self, tmp_path: Path) -> None:
        """A bad entry inside the file: the file, then the entry."""
        path = write_dataset_json(tmp_path, {"labels": {"x": "liver"}})
        with pytest.raises(ValueError, match=r"dataset\.json: label value 'x'"):
            parse_labels(str(path))


class TestDsegText:
    def test_a_header_row_then_one_row_per_label_by_value(self) -> None:
        """BIDS dseg.tsv: `index<TAB>name`, then each label, by value, newline-terminated."""
        text = dseg_text(label_table({"tumour": 2, "background": 0, "liver": 1}))
        assert text == b"index\tname\n0\tbackground\n1\tliver\n2\ttumour\n"

    def test_names_are_utf8(self) -> None:
        """Names outside ASCII are written as UTF-8."""
        assert dseg_text({1: "fégato"}).decode("utf-8").splitlines()[1] == "1\tfégato"


class TestCensus:
    def test_values_the_table_lacks_are_missing_background_aside(self) -> None:
        """Seen 0, 1, 3, 7 with a table of 1 and 2: 3 and 7 are missing, 0 is the background."""
        census = LabelCensus({1: "liver", 2: "tumour"})
        census.add(np.array([0, 1, 3, 3, 7], np.uint8))
        assert census.missing() == (3, 7)

    def test_the_background_is_not_missing_when_named_either(self) -> None:
        """A table that names 0 and every value seen: nothing missing."""
        census = LabelCensus({0: "background", 1: "liver"})
        census.add(np.array([[0, 1], [1, 0]], np.int16))
        assert census.missing() == ()

    def test_wide_ranges_are_counted_too(self) -> None:
        """Values far apart (no counting table) are found by sorting, negative ones too."""
        census = LabelCensus({1: "liver"})
        census.add(np.array([-5, 1, 2**40], np.int64))
        assert census.missing() == (-5, 2**40)

    def test_chunks_pass_through_unchanged(self) -> None:
        """`watch` hands on every chunk as it came, the header (first) not counted."""
        census = LabelCensus({1: "liver"})
        voxels = np.array([1, 4, 4, 9], np.uint16)
        chunks = [b"\x09\x00" * 2, memoryview(voxels.tobytes())]
        assert list(census.watch(chunks, np.dtype("<u2"))) == chunks
        assert census.missing() == (4, 9)

    @given(
        values=hnp.arrays(
            hnp.integer_dtypes(endianness="=") | hnp.unsigned_integer_dtypes(endianness="="),
            st.integers(1, 60),
        )
    )
    def test_the_values_found_are_the_distinct_values(self, values: np.ndarray) -> None:  # type: ignore[type-arg]
        """For any integer array, the census finds exactly its distinct values."""
        census = LabelCensus({})
        census.add(values)
        assert census.values == {int(value) for value in np.unique(values)}
