"""Names, file types and paths in the inbox, with a running service (README: "Names
and file types"): odd names are converted or failed with a code, their relative paths
kept; FIFOs, sockets, devices and folders named like inputs block nothing; a
subfolder swapped for a symlink never lets a file from outside in; trees deeper
than the path limit and an inbox behind a symlink do not stop the service."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from support import (
    ThreadedService,
    drop_by_rename,
    files_in,
    output_of,
    prediction,
    save_npy,
    write_reference,
)

from spools import instance_folder
from waiting import wait_until

Flipper = Callable[[Path, Path], Callable[[], None]]


def settled(service: ThreadedService, count: int) -> Callable[[], bool]:
    """True once `count` inputs were converted or failed."""
    return lambda: len(service.events("input_converted") + service.events("input_failed")) >= count


def archived(root: Path) -> list[str]:
    return files_in(root / "archive")


def visible(folder: Path) -> list[str]:
    """Files under `folder` outside hidden folders (the state folder)."""
    return [name for name in files_in(folder) if not name.startswith(".")]


class TestNames:
    def test_odd_names_are_converted_keeping_their_relative_paths(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Spaces, newlines, tabs, a leading dash, NFC and NFD forms of one name, bytes
        that are not UTF-8: each is converted to its own output, in its subfolder."""
        write_reference(root / "library" / "-case.nii.gz")
        names = [
            "case_with space.npy",
            "case_new\nline.npy",
            "case_tab\t.npy",
            "-case.npy",
            "case_caf\u00e9.npy",  # NFC
            "case_cafe\u0301.npy",  # NFD: another name for the same word
            os.fsdecode(b"case_\xff\xfe.npy"),  # not UTF-8
        ]
        service = start_service(root)
        for number, name in enumerate(names):
            drop_by_rename(root / "inbox", f"odd -folder/{name}", prediction(number))
        wait_until(settled(service, len(names)), what="every odd name handled")
        assert service.events("input_failed") == []
        converted = {event["input"] for event in service.events("input_converted")}
        assert converted == {f"odd -folder/{name}" for name in names}
        for number, name in enumerate(names):
            np.testing.assert_array_equal(
                output_of(root, f"odd -folder/{name}"), prediction(number)
            )
            assert (root / "archive" / "odd -folder" / name).is_file()
        assert visible(root / "inbox") == []

    def test_names_too_long_to_carry_fail_as_bad_name(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """A name of 255 bytes fits the inbox but not its outputs or error record: it
        fails once as bad_name under a shortened name whose record names the original,
        and the service goes on converting."""
        long_name = "case_" + "x" * 246 + ".npy"
        fitting = "case_" + "y" * 180 + ".npy"
        service = start_service(root)
        save_npy(root / "inbox" / "long" / long_name, prediction(1))  # no room for a temporary
        drop_by_rename(root / "inbox", f"long/{fitting}", prediction(2))
        wait_until(settled(service, 2), what="both long names handled")
        (failed,) = service.events("input_failed")
        assert failed["error"] == "bad_name"
        assert failed["input"] == f"long/{long_name}"
        shortened = Path(failed["failed_as"])
        assert shortened.parent == root / "failed" / "long"
        assert len(os.fsencode(shortened.name + ".error.json")) < 255
        np.testing.assert_array_equal(np.load(shortened), prediction(1))
        record = json.loads(shortened.with_name(shortened.name + ".error.json").read_text())
        assert record["input"] == f"long/{long_name}"
        assert record["error"] == "bad_name"
        np.testing.assert_array_equal(output_of(root, f"long/{fitting}"), prediction(2))
        drop_by_rename(root / "inbox", "case_after.npy", prediction(3))
        wait_until(lambda: len(service.events("input_converted")) == 2, what="a later input")
        assert service.events("input_retrying") == []
        assert visible(root / "inbox") == []


@contextlib.contextmanager
def bound_socket(path: Path) -> Iterator[None]:
    """A listening Unix socket at `path` (bound under a short name, then moved there:
    socket addresses are limited to about 100 bytes)."""
    with socket.socket(socket.AF_UNIX) as server:
        short = Path(tempfile.mkdtemp()) / "s"
        server.bind(str(short))
        server.listen()
        short.rename(path)
        short.parent.rmdir()
        yield


class TestFileTypes:
    def test_special_files_and_folders_named_like_inputs_block_nothing(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """FIFOs, a socket, a character device and a folder named `*.npy`: good inputs
        around them are converted, nothing hangs, the service stops cleanly, and each
        special file is left in the inbox, logged once as input_ignored."""
        inbox = root / "inbox"
        (inbox / "sub").mkdir()
        specials = [inbox / "case_fifo.npy", inbox / "sub" / "case_fifo.npz"]
        for fifo in specials:
            os.mkfifo(fifo)
        if os.geteuid() == 0:
            device = inbox / "case_device.npy"
            os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
            specials.append(device)
        (inbox / "case_folder.npy").mkdir()
        with bound_socket(inbox / "case_socket.npy"):
            specials.append(inbox / "case_socket.npy")
            service = start_service(root)
            save_npy(inbox / "case_folder.npy" / "case_inside.npy", prediction(0))
            for number in range(3):
                drop_by_rename(inbox, f"case_{number}.npy", prediction(number))
            wait_until(lambda: len(service.events("input_converted")) == 4, what="the good inputs")
            started = time.monotonic()
            assert service.stop() == 0
            assert time.monotonic() - started < 10
        np.testing.assert_array_equal(
            output_of(root, "case_folder.npy/case_inside.npy"), prediction(0)
        )
        assert (inbox / "case_folder.npy").is_dir()
        for special in specials:
            relative = special.relative_to(inbox)
            places = [
                folder / relative
                for folder in (inbox, root / "failed", root / "archive")
                if os.path.lexists(folder / relative)
            ]
            assert places == [special], special
            assert not stat.S_ISREG(special.lstat().st_mode)
        ignored = sorted(event["input"] for event in service.events("input_ignored"))
        assert ignored == sorted(str(special.relative_to(inbox)) for special in specials)
        assert not list((root / "outbox").glob("case_fifo*"))
        assert files_in(instance_folder(inbox.parent) / "claimed") == []


class TestPathEscape:
    def test_a_subfolder_swapped_for_a_symlink_never_lets_outside_files_in(
        self, root: Path, start_service: Callable[..., ThreadedService], flip_names: Flipper
    ) -> None:
        """While `inbox/sub` is exchanged with a symlink to an outside folder over and
        over and inputs arrive in it, the service converts the inbox's own inputs and
        never claims, converts or archives a file that exists only outside."""
        inbox, outside = root / "inbox", root / "outside"
        (inbox / "sub").mkdir()
        (inbox / ".staging").mkdir()
        outside.mkdir()
        secrets = [f"case_secret{number}.npy" for number in range(20)]
        for number, name in enumerate(secrets):
            save_npy(outside / name, prediction(100 + number))
        (root / "link").symlink_to(outside)
        real_sub = os.open(inbox / "sub", os.O_RDONLY | os.O_DIRECTORY)
        staging = os.open(inbox / ".staging", os.O_RDONLY | os.O_DIRECTORY)
        service = start_service(root, rescan_interval=0.2)
        stop = flip_names(inbox / "sub", root / "link")
        try:
            inside = [f"case_inside{number}.npy" for number in range(20)]
            for number, name in enumerate(inside):
                save_npy(inbox / ".staging" / name, prediction(number))
                # Into the real folder wherever it is now: a producer with a handle on it.
                os.rename(name, name, src_dir_fd=staging, dst_dir_fd=real_sub)
            # Flip for a while, and while the service converts.
            deadline = time.monotonic() + 2
            wait_until(
                lambda: time.monotonic() > deadline and settled(service, 5)(),
                what="conversions while flipping",
            )
        finally:
            stop()
            os.close(real_sub)
            os.close(staging)
        wait_until(settled(service, len(inside)), what="every inside input")
        assert sorted(path.name for path in outside.iterdir()) == sorted(secrets)
        for number, name in enumerate(secrets):
            np.testing.assert_array_equal(np.load(outside / name), prediction(100 + number))
        handled = {event["input"] for event in service.events("input_converted")}
        assert handled == {f"sub/{name}" for name in inside}
        assert service.events("input_failed") == []
        assert archived(root) == sorted(f"sub/{name}" for name in inside)
        assert not list((root / "outbox").rglob("case_secret*"))


class TestDeepTrees:
    def test_a_tree_deeper_than_the_path_limit_does_not_stop_the_service(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """Rescans go on past a tree longer than PATH_MAX (its unreachable part logged
        once); a file whose claimed path would be too long fails as bad_name at the top
        of failed; other inputs are converted."""
        inbox = root / "inbox"
        path_max = os.pathconf(inbox, "PC_PATH_MAX")
        folder = inbox  # made so long that only the claim folder's name does not fit
        while len(os.fsencode(folder)) + 201 < path_max - 30:
            folder = folder / ("d" * 200)
        folder = folder / ("e" * (path_max - 30 - len(os.fsencode(folder)) - 1))
        folder.mkdir(parents=True)
        near = save_npy(folder / "case_near.npy", prediction(1))  # its claim would not fit
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(3):  # beyond the limit: made through descriptors
                os.mkdir("d" * 200, dir_fd=descriptor)
                deeper = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=descriptor)
                os.close(descriptor)
                descriptor = deeper
            os.close(os.open("case_far.npy", os.O_CREAT | os.O_WRONLY, dir_fd=descriptor))
        finally:
            os.close(descriptor)
        service = start_service(root, rescan_interval=0.2)
        drop_by_rename(inbox, "case_top.npy", prediction(2))
        wait_until(settled(service, 2), what="the near and top inputs")
        np.testing.assert_array_equal(output_of(root, "case_top.npy"), prediction(2))
        (failed,) = service.events("input_failed")
        assert failed["error"] == "bad_name"
        assert failed["input"] == near.relative_to(inbox).as_posix()
        assert Path(failed["failed_as"]) == root / "failed" / "case_near.npy"
        for _ in range(3):  # more rescans: the unreachable folder is still logged once
            service.service.request_rescan()
            wait_until(lambda: not service.service._rescan_requested, what="a rescan")
        (ignored,) = service.events("input_ignored")
        assert "longer than the system allows" in ignored["reason"]
        assert service.thread.is_alive()
        assert service.stop() == 0


class TestInboxBehindASymlink:
    def test_an_inbox_reached_through_a_symlink_is_watched(
        self, root: Path, start_service: Callable[..., ThreadedService]
    ) -> None:
        """A common set-up (`/srv/spool -> /mnt/nas/spool`): the inbox is resolved once at
        start and its inotify watch sees new inputs."""
        (root / "mounted").mkdir()
        (root / "spool").symlink_to(root / "mounted")
        service = start_service(root, inbox="spool", observer="inotify", rescan_interval=600)
        drop_by_rename(root / "spool", "case_1.npy", prediction(1))
        wait_until(lambda: service.events("input_converted"), what="the input converted")
        np.testing.assert_array_equal(output_of(root, "case_1.npy"), prediction(1))
        assert visible(root / "mounted") == []


@pytest.fixture(autouse=True)
def _no_leftover_claims(root: Path) -> Iterator[None]:
    yield
    claimed = instance_folder(root) / "claimed"
    if claimed.is_dir():
        assert files_in(claimed) == []
