"""`niftidrop.drop` against real watchers and the real service (README: File protocol
for producers): the final name never shows a partial file, and each drop is
converted once."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from support import ServiceProcess, write_reference

from niftidrop import drop
from niftidrop.inotify import IN_CLOSE_WRITE, IN_CREATE, IN_MODIFY, IN_MOVED_TO, Inotify
from niftidrop.names import is_hidden
from waiting import wait_until

# Large enough that writing one takes many system calls and milliseconds.
LARGE = (256, 256, 96)  # float32: 24 MiB
DROPS = 5


class Sightings:
    """Every size a watcher saw under each visible name of a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sizes: dict[str, list[int]] = {}
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def look(self, name: str) -> None:
        if is_hidden(name):
            return
        try:
            size = (self.folder / name).stat().st_size
        except FileNotFoundError:
            return
        with self._lock:
            self.sizes.setdefault(name, []).append(size)

    def polling(self) -> None:
        """A tight polling loop, as a watcher without inotify (NFS, FUSE) would run."""
        while not self.stop.is_set():
            for path in self.folder.iterdir():
                self.look(path.name)

    def inotify(self, ready: threading.Event) -> None:
        """Looks at a name the moment inotify reports it created, written or renamed in."""
        watcher = Inotify()
        try:
            watcher.add_watch(
                os.fsencode(self.folder), IN_CREATE | IN_MOVED_TO | IN_MODIFY | IN_CLOSE_WRITE
            )
            ready.set()
            while not self.stop.is_set():
                for event in watcher.read(timeout=0.05):
                    self.look(os.fsdecode(event.name))
        finally:
            watcher.close()

    def partial(self, final: dict[str, int]) -> dict[str, list[int]]:
        """The names seen with fewer bytes than their final size, and those sizes."""
        with self._lock:
            return {
                name: [size for size in sizes if size < final[name]]
                for name, sizes in self.sizes.items()
                if any(size < final[name] for size in sizes)
            }


def watched(folder: Path, write: Callable[[], dict[str, int]]) -> tuple[Sightings, dict[str, int]]:
    """Run `write` while a polling and an inotify watcher look at `folder`."""
    sightings = Sightings(folder)
    ready = threading.Event()
    threads = [
        threading.Thread(target=sightings.polling, daemon=True),
        threading.Thread(target=sightings.inotify, args=(ready,), daemon=True),
    ]
    for thread in threads:
        thread.start()
    assert ready.wait(10)
    try:
        final = write()
    finally:
        sightings.stop.set()
        for thread in threads:
            thread.join(10)
    return sightings, final


def large(seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).random(LARGE, dtype=np.float32)


class TestNeverPartial:
    def test_watchers_never_see_a_dropped_name_short_of_its_size(self, tmp_path: Path) -> None:
        """Five 24 MiB arrays dropped while an inotify and a polling watcher look: every
        sighting of a final name has its final size."""

        def write() -> dict[str, int]:
            final = {}
            for seed in range(DROPS):
                path = drop(large(seed), tmp_path, f"case{seed}.npy")
                final[path.name] = path.stat().st_size
            return final

        sightings, final = watched(tmp_path, write)
        assert set(sightings.sizes) == set(final)  # each name was seen
        assert sightings.partial(final) == {}

    def test_the_watchers_do_see_a_file_written_in_place(self, tmp_path: Path) -> None:
        """The control: `np.save` straight to the final name is seen partial by the same
        watchers, so their silence above means something."""

        def write() -> dict[str, int]:
            path = tmp_path / "case.npy"
            with path.open("wb") as file:
                np.save(file, large(0))
            return {path.name: path.stat().st_size}

        sightings, final = watched(tmp_path, write)
        assert sightings.partial(final)


class TestConvertedOnce:
    def test_the_service_converts_each_drop_once(
        self, tmp_path: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """A real service, watching as large arrays are dropped into the inbox and a
        subfolder: each is converted exactly once, whole, and archived once."""
        shape = (128, 128, 96)
        for seed in range(DROPS):
            write_reference(tmp_path / "library" / f"case{seed}.nii.gz", shape)
        service = start_process(tmp_path, "--workers", "2").wait_ready()
        arrays = {}
        for seed in range(DROPS):
            name = f"case{seed}.npy" if seed % 2 else f"site/case{seed}.npy"
            arrays[name] = np.random.default_rng(seed).random(shape, dtype=np.float32)
            drop(arrays[name], tmp_path / "inbox", name)
        wait_until(lambda: len(service.events("input_converted")) >= DROPS, 120, "conversions")
        converted = [event["input"] for event in service.events("input_converted")]
        assert sorted(converted) == sorted(arrays)
        assert not service.events("input_failed")
        for name, array in arrays.items():
            stem = name.removesuffix(".npy")
            output = nib.load(tmp_path / "outbox" / f"{stem}.nii.gz")
            np.testing.assert_array_equal(np.asarray(output.dataobj), array)
            assert (tmp_path / "archive" / name).is_file()
        archived = sorted(
            str(path.relative_to(tmp_path / "archive"))
            for path in (tmp_path / "archive").rglob("*")
            if path.is_file()
        )
        assert archived == sorted(arrays)  # once each: no `-1` second copy
        service.send(signal.SIGTERM)
        assert service.wait() == 0
        assert len(service.events("input_converted")) == DROPS
