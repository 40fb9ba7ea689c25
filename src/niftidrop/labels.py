"""Label names (README: Conversion, labels): the table, its `dseg.tsv`, the values seen.

The `labels` setting names the values of a label map: a table of value → name
(`{1 = "liver", 2 = "tumour"}`; TOML keys are strings, so integer-like strings
are taken), the same table the other way round, name → value, as nnU-Net v2's
`dataset.json` writes it (`{"background": 0, "liver": 1}`), or the path of such
a `dataset.json` (its `labels` map is used). The direction is read from the
table: names as values, or numbers as values; a table that mixes the two is an
error. nnU-Net v2 region labels (a name for a list of values, region-based
training) name the value nnU-Net writes for that region: the one at its place in
`regions_class_order`, which such a `dataset.json` carries.

An integer output gets `<stem>.dseg.tsv` beside it (BIDS: tab-separated `index`
and `name`, a header row, one row per label, by value), and the values in the
data that the table lacks are reported (`labels_incomplete`). Value 0, the
background, is never reported missing: tables often leave it out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

LabelTable = dict[int, str]
# Label values are whole numbers, written as such: TOML and JSON keys are strings.
_INTEGER: Final = re.compile(r"[+-]?\d+")
# Names end up in a tab-separated file, one per line.
_NOT_IN_NAMES: Final = ("\t", "\n", "\r")
BACKGROUND: Final = 0
# Above this range of values, a slab's values are found by sorting instead of counting.
_COUNTED_RANGE: Final = 1 << 16
_INTP_MAX: Final = int(np.iinfo(np.intp).max)
_INTP_BYTES: Final = np.dtype(np.intp).itemsize
_PIECE: Final = 1 << 20  # values counted at a time


def parse_labels(value: Any) -> LabelTable | None:
    """The `labels` setting as value → name, from a table, its JSON text, or the path
    of an nnU-Net `dataset.json`; ValueError saying what is wrong."""
    if value is None or isinstance(value, Mapping):
        return None if value is None else label_table(value)
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            table = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a JSON table: {error}") from None
        if not isinstance(table, dict):
            raise ValueError("not a JSON table")
        return label_table(table)
    if isinstance(value, str | Path) and str(value).strip():
        return read_dataset_json(Path(value).expanduser())
    raise ValueError("neither a table nor a path")


def read_dataset_json(path: Path) -> LabelTable:
    """The labels of an nnU-Net `dataset.json` (its `labels` map) as value → name."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read: {error}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    labels = document.get("labels") if isinstance(document, dict) else None
    if not isinstance(labels, dict):
        raise ValueError(f"{path} has no labels table")
    try:
        return label_table(labels, regions_class_order=document.get("regions_class_order"))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def label_table(table: Mapping[Any, Any], *, regions_class_order: Any = None) -> LabelTable:
    """`table` (value → name, or name → value) as value → name, checked: whole values
    of at least 0, each named once, names that fit a line of a tab-separated file."""
    if not table:
        raise ValueError("the table is empty")
    if all(isinstance(name, str) for name in table.values()):
        pairs = [(_value(key), name) for key, name in table.items()]
    elif all(_is_values(value) for value in table.values()):
        pairs = list(_named_values(table, regions_class_order))
    else:
        raise ValueError("its entries are neither all names nor all whole numbers")
    result: LabelTable = {}
    for value, name in pairs:
        if not name.strip() or any(character in name for character in _NOT_IN_NAMES):
            raise ValueError(f"label {value} has the name {name!r}: expected text on one line")
        if value in result:
            raise ValueError(f"value {value} is named twice ({result[value]!r}, {name!r})")
        result[value] = name
    return dict(sorted(result.items()))


def _value(key: Any) -> int:
    """A label value: a whole number of at least 0, or a string that spells one."""
    if isinstance(key, int) and not isinstance(key, bool):
        value = key
    elif isinstance(key, str) and _INTEGER.fullmatch(key.strip()):
        value = int(key)
    else:
        raise ValueError(f"label value {key!r} is not a whole number")
    if value < 0:
        raise ValueError(f"label value {value} is below 0")
    return value


def _is_values(value: Any) -> bool:
    """A label's value in a name → value table: a number, or a list of them (a region)."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(item, int) for item in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _named_values(table: Mapping[Any, Any], regions_class_order: Any) -> Iterator[tuple[int, str]]:
    """(value, name) of a name → value table. With `regions_class_order` (nnU-Net's
    region-based training), the k-th label after the background is written as its
    k-th value; without it a region must be one value."""
    order = regions_class_order
    foreground = [name for name, value in table.items() if value != BACKGROUND]
    if order is not None and (
        not isinstance(order, list)
        or len(order) != len(foreground)
        or not all(map(_is_values, order))
    ):
        raise ValueError(
            f"expected regions_class_order to give one value for each of the {len(foreground)} "
            f"labels after the background, found {order!r}"
        )
    for name, value in table.items():
        if value == BACKGROUND:
            yield BACKGROUND, str(name)
        elif order is not None:
            yield _value(order[foreground.index(name)]), str(name)
        elif isinstance(value, list) and len(value) != 1:
            raise ValueError(
                f"label {name!r} is a region of values {value}: expected regions_class_order "
                "to say which value nnU-Net writes for it, found none"
            )
        else:
            yield _value(value[0] if isinstance(value, list) else value), str(name)


def dseg_text(table: LabelTable) -> bytes:
    """The BIDS segmentation table: a header row, then one `index<TAB>name` row per label."""
    rows = ["index\tname", *(f"{value}\t{name}" for value, name in table.items())]
    return ("\n".join(rows) + "\n").encode("utf-8")


def sidecar_labels(table: LabelTable) -> dict[str, str]:
    """The labels as the provenance sidecar lists them (JSON keys are strings)."""
    return {str(value): name for value, name in table.items()}


class LabelCensus:
    """The values an integer output holds, gathered from its bytes as they are written,
    against the names of `table`."""

    def __init__(self, table: LabelTable) -> None:
        self.table = table
        self.values: set[int] = set()

    def __repr__(self) -> str:
        return f"LabelCensus({len(self.values)} values)"

    def watch(
        self, chunks: Iterable[bytes | memoryview], dtype: np.dtype[Any]
    ) -> Iterator[bytes | memoryview]:
        """`chunks` of one NIfTI file (its header first, then its voxels as `dtype`),
        passed on unchanged; the voxels' values are counted on the way."""
        iterator = iter(chunks)
        header = next(iterator, None)
        if header is None:
            return
        yield header
        for chunk in iterator:
            self.add(np.frombuffer(chunk, dtype=dtype))
            yield chunk

    def add(self, values: npt.NDArray[Any]) -> None:
        """Count the distinct values of an integer array."""
        if values.size == 0:
            return
        flat = values.reshape(-1)
        low, high = int(flat.min()), int(flat.max())
        if high - min(low, 0) >= _COUNTED_RANGE or high > _INTP_MAX:
            self.values.update(int(value) for value in np.unique(flat))
            return
        # Counting is linear where sorting (np.unique) is not; in pieces, so that the
        # offsets (as wide as a pointer) stay small beside a slab.
        base = min(low, 0)  # label maps hold no negative values: counted as they are
        counts = np.zeros(high - base + 1, dtype=np.intp)
        for start in range(0, flat.size, _PIECE):
            piece = flat[start : start + _PIECE]
            direct = base == 0 and piece.dtype.itemsize < _INTP_BYTES  # cast safely
            offsets = piece if direct else piece.astype(np.intp) - base
            counts += np.bincount(offsets, minlength=counts.size)
        self.values.update(int(offset) + base for offset in np.flatnonzero(counts))

    def missing(self) -> tuple[int, ...]:
        """The values seen that the table does not name, background (0) aside, in order."""
        unnamed = self.values - self.table.keys() - {BACKGROUND}
        return tuple(sorted(unnamed))
