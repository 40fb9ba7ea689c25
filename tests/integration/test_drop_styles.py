"""Every way producers drop files is converted exactly once, never read early (README: File
protocol)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from support import (
    SHAPE,
    ThreadedService,
    drop_by_rename,
    files_in,
    output_of,
    prediction,
    save_npy,
)

from waiting import wait_until


def converted_inputs(service: ThreadedService) -> list[str]:
    return sorted(line["input"] for line in service.events("input_converted"))


class TestDropStyles:
    def test_every_producer_style(
        self, root: Path, start_service: Callable[..., ThreadedService], tmp_path: Path
    ) -> None:
        """np.save in place, move in, temp+rename, copy and npz all convert once."""
        service = start_service(root)
        inbox = root / "inbox"
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        save_npy(inbox / "case_inplace.npy", prediction(1))
        save_npy(elsewhere / "case_moved.npy", prediction(2)).rename(inbox / "case_moved.npy")
        drop_by_rename(inbox, "case_renamed.npy", prediction(3))
        shutil.copyfile(save_npy(elsewhere / "x.npy", prediction(4)), inbox / "case_copied.npy")
        np.savez_compressed(elsewhere / "case_zipped.npz", pred=prediction(5))
        (elsewhere / "case_zipped.npz").rename(inbox / "case_zipped.NPZ")
        drop_by_rename(inbox, "site/deep/case_nested.npy", prediction(6))
        seeds = {
            "case_copied.npy": 4,
            "case_inplace.npy": 1,
            "case_moved.npy": 2,
            "case_renamed.npy": 3,
            "case_zipped.NPZ": 5,
            "site/deep/case_nested.npy": 6,
        }
        wait_until(lambda: converted_inputs(service) == sorted(seeds), what="all converted")
        for name, seed in seeds.items():
            assert np.array_equal(output_of(root, name), prediction(seed))
        assert files_in(root / "archive") == sorted(seeds)
        assert service.events("input_failed") == []

    def test_hidden_and_temporary_names_are_left_alone(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Hidden and partial-download names stay in the inbox untouched."""
        service = start_service(root)
        inbox = root / "inbox"
        ignored = [".case.npy", "case.npy.part", "case.npy.tmp", "case.npy~", "case.npy.crdownload"]
        for name in ignored:
            save_npy(inbox / name, prediction(0))
        drop_by_rename(inbox, "case_marker.npy", prediction(0))
        wait_until(lambda: converted_inputs(service) == ["case_marker.npy"])
        assert sorted(path.name for path in inbox.iterdir() if path.is_file()) == sorted(ignored)

    def test_slow_writer_is_never_read_early(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """A .npy written in pieces over seconds (open throughout) is converted once, whole."""
        service = start_service(root, settle_seconds=0.5)
        data = prediction(9, shape=SHAPE)
        path = root / "inbox" / "case_slow.npy"
        payload = _npy_bytes(data)
        pieces = [payload[i : i + 40] for i in range(0, len(payload), 40)]
        with path.open("wb") as handle:
            for piece in pieces:
                handle.write(piece)
                handle.flush()
                _pause(3.0 / len(pieces))
                assert service.events("input_converted") == []
                assert service.events("input_failed") == []
        wait_until(lambda: converted_inputs(service) == ["case_slow.npy"])
        assert np.array_equal(output_of(root, "case_slow.npy"), data)

    def test_writer_that_reopens_for_each_piece(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Close events of a half-written file do not make it readable early."""
        service = start_service(root)
        data = prediction(11)
        payload = _npy_bytes(data)
        path = root / "inbox" / "case_pieces.npy"
        step = len(payload) // 4
        for start in range(0, len(payload), step):
            with path.open("ab") as handle:
                handle.write(payload[start : start + step])
            _pause(0.5)
            if start + step < len(payload):
                assert service.events("input_converted") == []
                assert service.events("input_failed") == []
        wait_until(lambda: converted_inputs(service) == ["case_pieces.npy"])
        assert np.array_equal(output_of(root, "case_pieces.npy"), data)

    def test_producer_racing_the_service_with_same_names(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Many drops of the same name are each archived once, none overwritten."""
        service = start_service(root, on_conflict="rename")
        for seed in range(12):
            drop_by_rename(root / "inbox", "case_same.npy", prediction(seed))
            wait_until(lambda: not (root / "inbox" / "case_same.npy").exists())
        wait_until(lambda: len(service.events("input_converted")) == 12)
        archived = files_in(root / "archive")
        assert len(archived) == 12
        assert len(files_in(root / "outbox")) == 12


def _npy_bytes(array: np.ndarray[object, np.dtype[np.uint8]]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _pause(seconds: float) -> None:
    """The producer's own pacing: the writer is slow on purpose (not a wait for the service)."""
    time.sleep(seconds)
