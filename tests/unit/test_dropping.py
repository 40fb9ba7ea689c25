"""Tests of `niftidrop.drop`, a producer's write into the inbox (README: File protocol
for producers, Python API)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import niftidrop
from niftidrop.arrays import open_input
from niftidrop.dropping import drop
from niftidrop.listing import scan_inbox
from niftidrop.steps import STEPS, hooked


def every_file(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


class TestWrites:
    def test_an_array_becomes_the_npy_the_service_reads(self, tmp_path: Path) -> None:
        """An array is written as a .npy with its dtype, shape and values, and its path returned."""
        array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
        path = drop(array, tmp_path, "case001.npy")
        assert path == tmp_path / "case001.npy"
        loaded = open_input(path, npz_key=None, max_input_bytes=1 << 20).data
        assert loaded.dtype == np.int16
        np.testing.assert_array_equal(loaded, array)

    def test_a_mapping_becomes_an_npz_with_its_first_entry_first(self, tmp_path: Path) -> None:
        """A mapping is a .npz whose members keep its order: the service converts the first."""
        first, second = np.ones((2, 2), np.float32), np.zeros(3, np.uint8)
        path = drop({"probabilities": first, "file": second}, tmp_path, "case.npz")
        with np.load(path) as archive:
            assert list(archive.keys()) == ["probabilities", "file"]
            np.testing.assert_array_equal(archive["file"], second)
        chosen = open_input(path, npz_key=None, max_input_bytes=1 << 20).data
        np.testing.assert_array_equal(chosen, first)

    def test_compressed_members_are_read_as_well(self, tmp_path: Path) -> None:
        """`compressed=True` deflates the members; the service reads them all the same."""
        array = np.zeros((16, 16, 16), np.uint8)
        path = drop({"seg": array}, tmp_path, "case.npz", compressed=True)
        assert path.stat().st_size < array.nbytes
        loaded = open_input(path, npz_key=None, max_input_bytes=1 << 20).data
        np.testing.assert_array_equal(loaded, array)

    def test_subfolders_named_are_created(self, tmp_path: Path) -> None:
        """A name with folders creates them under the inbox."""
        path = drop(np.zeros(3), tmp_path, "site/a/case.npy")
        assert path == tmp_path / "site" / "a" / "case.npy"
        assert every_file(tmp_path) == ["site/a/case.npy"]

    def test_paths_may_be_path_objects(self, tmp_path: Path) -> None:
        """`inbox` and `name` may be `str` or `Path`."""
        path = drop([1, 2, 3], str(tmp_path), PurePosixPath("site") / "case.npy")
        np.testing.assert_array_equal(np.load(path), [1, 2, 3])

    def test_an_existing_file_is_replaced_whole(self, tmp_path: Path) -> None:
        """Dropping a name twice leaves the second array under it, and nothing else."""
        drop(np.zeros(4), tmp_path, "case.npy")
        drop(np.ones(2), tmp_path, "case.npy")
        np.testing.assert_array_equal(np.load(tmp_path / "case.npy"), np.ones(2))
        assert every_file(tmp_path) == ["case.npy"]

    def test_no_temporary_file_is_left(self, tmp_path: Path) -> None:
        """After a drop the folder holds the final name only (the hidden temporary is gone)."""
        drop(np.zeros((8, 8)), tmp_path, "case.npy")
        assert [path.name for path in tmp_path.iterdir()] == ["case.npy"]

    def test_it_is_exported_from_the_package(self) -> None:
        """`from niftidrop import drop` gives this function."""
        assert niftidrop.drop is drop
        assert "drop" in niftidrop.__all__


class TestRefusals:
    @pytest.mark.parametrize(
        ("name", "words"),
        [
            (".case.npy", "not hidden"),
            ("case.npy.tmp", "not ending in .tmp"),
            ("case.npy~", "not ending in"),
            ("case.partial", "ending in .npy or .npz"),
            ("case.txt", "ending in .npy or .npz"),
            ("../case.npy", "stays inside the inbox"),
            ("site/../../case.npy", "stays inside the inbox"),
            ("/srv/inbox/case.npy", "relative to the inbox"),
            (".hidden/case.npy", "no hidden folder"),
            ("", "a file name"),
        ],
    )
    def test_a_name_the_service_ignores_is_refused(
        self, tmp_path: Path, name: str, words: str
    ) -> None:
        """Each kind of name the service never reads is refused, saying why; nothing is written."""
        with pytest.raises(ValueError, match="the service would never read it") as raised:
            drop(np.zeros(2), tmp_path, name)
        assert words in str(raised.value)
        assert every_file(tmp_path) == []

    def test_an_array_under_an_npz_name_is_refused(self, tmp_path: Path) -> None:
        """The extension must say what the data is: an array is a .npy."""
        with pytest.raises(ValueError, match=r"case.npz: expected a name ending in .npy"):
            drop(np.zeros(2), tmp_path, "case.npz")

    def test_a_mapping_under_an_npy_name_is_refused(self, tmp_path: Path) -> None:
        """A mapping is a .npz."""
        with pytest.raises(ValueError, match=r"case.npy: expected a name ending in .npz"):
            drop({"a": np.zeros(2)}, tmp_path, "case.npy")

    def test_the_extension_may_be_in_any_case(self, tmp_path: Path) -> None:
        """`.NPY` is a .npy to the service, so it is accepted."""
        assert drop(np.zeros(2), tmp_path, "CASE.NPY").name == "CASE.NPY"

    @pytest.mark.parametrize(
        "data",
        [np.array(["a", "b"]), np.array([object()], dtype=object), np.zeros(2, dtype="i4,f4")],
        ids=["strings", "objects", "structured"],
    )
    def test_data_the_service_refuses_is_refused_first(self, tmp_path: Path, data: Any) -> None:
        """Strings, objects (pickled) and structured arrays would fail in the service: refused."""
        with pytest.raises(ValueError, match="expected numbers or booleans"):
            drop(data, tmp_path, "case.npy")
        assert every_file(tmp_path) == []

    def test_a_bad_member_is_named(self, tmp_path: Path) -> None:
        """In a mapping, the message names the member that holds no numbers."""
        with pytest.raises(ValueError, match=r"case\.npz, member 'names'"):
            drop({"seg": np.zeros(2), "names": np.array(["x"])}, tmp_path, "case.npz")

    def test_an_empty_mapping_is_refused(self, tmp_path: Path) -> None:
        """A .npz without a member would fail as empty_npz: refused."""
        with pytest.raises(ValueError, match="at least one array"):
            drop({}, tmp_path, "case.npz")


DROP_STEPS = tuple(name for name in STEPS if name.startswith("drop_"))


class TestFaults:
    @pytest.mark.parametrize("at", DROP_STEPS)
    def test_a_failure_at_any_step_leaves_no_file(self, tmp_path: Path, at: str) -> None:
        """A full disk at any step of the write: the error reaches the caller, and neither
        the final name nor a temporary file is left."""

        def fail(name: str) -> None:
            if name == at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with hooked(fail), pytest.raises(OSError, match="No space left"):
            drop(np.zeros((4, 4)), tmp_path, "site/case.npy")
        assert every_file(tmp_path) == []

    def test_the_steps_are_the_writes_phases(self, tmp_path: Path) -> None:
        """A drop goes through create, write, fsync and commit, each announced."""
        seen: list[str] = []
        with hooked(seen.append):
            drop(np.zeros(2), tmp_path, "case.npy")
        assert tuple(name for name in seen if name.startswith("drop_")) == DROP_STEPS
        assert seen[-1] == "folder_fsync"  # the rename made durable


# Names built from the pieces that decide whether the service reads a file.
_PIECES = st.sampled_from(
    ["case", "a b", "é", ".", "..", ".hidden", "x~", "x.tmp", "x.part", "x.partial", "x.crdownload"]
)
_ENDINGS = st.sampled_from(
    [
        ".npy",
        ".NPY",
        ".npz",
        ".Npz",
        ".npy.tmp",
        ".npy.part",
        ".npy~",
        ".txt",
        "",
        ".npy.crdownload",
    ]
)
_NAMES = st.builds(
    lambda folders, prefix, stem, ending: "/".join([*folders, prefix + stem + ending]),
    st.lists(_PIECES, max_size=3),
    st.sampled_from(["", "", ".", "/"]),
    _PIECES,
    _ENDINGS,
)


class TestAcceptedNamesAreTheServicesOwn:
    @hypothesis_settings(
        max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(name=_NAMES)
    def test_drop_accepts_exactly_the_names_the_inbox_scan_takes(self, name: str) -> None:
        """For any name: drop accepts it exactly when the service's own inbox scan finds a
        file written there by hand, and then finds it at the path drop returned."""
        with tempfile.TemporaryDirectory() as base:
            inbox = Path(base) / "inbox"
            inbox.mkdir()
            array = np.zeros(2, np.uint8)
            data: Any = {"a": array} if name.lower().endswith(".npz") else array
            try:
                placed: Path | None = drop(data, inbox, name)
            except ValueError:
                placed = None
            if placed is not None:
                assert list(scan_inbox(inbox, recursive=True)) == [placed]
                return
            relative = PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                return  # refused: a path that leaves the inbox, or no name at all
            # Refused: the same name written by hand is never taken by the service.
            by_hand = inbox / relative
            by_hand.parent.mkdir(parents=True, exist_ok=True)
            by_hand.write_bytes(b"x")
            assert list(scan_inbox(inbox, recursive=True)) == []
