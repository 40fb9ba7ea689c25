"""Conversions in child processes: results, errors and deaths cross back to the worker."""

from __future__ import annotations

import io
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fifos import wait_for_reader
from niftidrop import ConversionError, ErrorCode, convert_file
from niftidrop.conversion_child import receive, send
from niftidrop.processes import ConversionCrashed, ConversionProcess
from niftidrop.settings import Settings
from waiting import wait_until

MakeReference = Callable[..., Path]
SETTINGS = Settings.model_validate({"fsync": False})


@pytest.fixture
def process() -> Iterator[ConversionProcess]:
    process = ConversionProcess()
    process.start()
    process.wait_ready()
    yield process
    process.close()


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts: it runs no more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


class TestCalls:
    """What a call returns or raises, as if converted in this process."""

    def test_converts_exactly_like_convert_file(
        self, process: ConversionProcess, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """The child's output has the same bytes as one written in this process."""
        reference = make_reference(shape=(8, 9, 10))
        source = tmp_path / "case.npy"
        np.save(source, np.arange(720, dtype=np.int16).reshape(8, 9, 10))
        here = convert_file(source, tmp_path / "here", settings=SETTINGS, reference=reference)
        there = process(source, tmp_path / "there", settings=SETTINGS, reference=reference)
        assert there.outputs == (tmp_path / "there" / "case.nii.gz",)
        assert (there.shape_out, there.dtype_out) == (here.shape_out, here.dtype_out)
        assert there.outputs[0].read_bytes() == here.outputs[0].read_bytes()

    def test_each_call_converts_with_its_own_settings(
        self, process: ConversionProcess, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """Settings sent once and then stood for by a marker (the same object as the
        last call's), or sent again when they change: each call uses its own."""
        reference = make_reference(shape=(4, 5, 6))
        source = tmp_path / "case.npy"
        np.save(source, np.ones((4, 5, 6), np.uint8))
        plain = Settings.model_validate({"fsync": False, "compress": False})
        for number, settings in enumerate([SETTINGS, SETTINGS, plain, plain, SETTINGS]):
            out = tmp_path / str(number)
            result = process(source, out, settings=settings, reference=reference)
            name = "case.nii.gz" if settings.compress else "case.nii"
            assert result.outputs == (out / name,)

    def test_a_rejection_crosses_with_its_code(
        self, process: ConversionProcess, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """A ConversionError raised in the child is raised here, code and reference kept."""
        reference = make_reference(shape=(8, 9, 10))
        source = tmp_path / "case.npy"
        np.save(source, np.zeros((3, 3, 3), np.float32))
        with pytest.raises(ConversionError) as raised:
            process(source, tmp_path, settings=SETTINGS, reference=reference)
        assert raised.value.code is ErrorCode.SHAPE_MISMATCH
        assert raised.value.reference == reference
        assert "expected" in raised.value.message

    def test_an_environmental_error_crosses_as_itself(
        self, process: ConversionProcess, tmp_path: Path
    ) -> None:
        """An OSError in the child (an outbox that cannot be made) is raised here as is."""
        source = tmp_path / "case.npy"
        np.save(source, np.zeros((3, 3, 3), np.float32))
        (tmp_path / "file").write_text("not a folder")
        with pytest.raises(NotADirectoryError, match="file"):
            process(source, tmp_path / "file" / "out", settings=SETTINGS, reference=None)


class TestLifecycle:
    """How a child starts, dies, is replaced and ends."""

    def test_a_child_killed_mid_call_is_reported_and_replaced(
        self, process: ConversionProcess, tmp_path: Path
    ) -> None:
        """Killed while converting: ChildProcessError (an OSError, so retried); the next
        call runs in a new child."""
        source = tmp_path / "case.npy"
        np.save(source, np.zeros((3, 3, 3), np.uint8))
        blocking = tmp_path / "reference.nii"
        os.mkfifo(blocking)  # read first by the conversion: it waits for bytes that never come
        first = process.pid
        assert first is not None
        raised: list[BaseException] = []

        def call() -> None:
            try:
                process(source, tmp_path / "out", settings=SETTINGS, reference=blocking)
            except BaseException as error:
                raised.append(error)

        caller = threading.Thread(target=call)
        caller.start()
        writer = wait_for_reader(
            blocking, timeout=20.0
        )  # the child is in the call, reading the reference
        os.kill(first, signal.SIGKILL)
        caller.join(timeout=20)
        os.close(writer)
        assert len(raised) == 1
        assert isinstance(raised[0], ChildProcessError)
        assert "SIGKILL" in str(raised[0])
        result = process(source, tmp_path / "out", settings=SETTINGS, reference=None)
        assert result.outputs[0].exists()
        assert process.pid not in (None, first)

    def test_terminal_and_stop_signals_do_not_end_a_child(
        self, process: ConversionProcess, tmp_path: Path
    ) -> None:
        """SIGINT and SIGTERM (a terminal's Ctrl-C, systemd's stop) are the service's to
        handle: the child keeps serving until it is closed."""
        pid = process.pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        source = tmp_path / "case.npy"
        np.save(source, np.zeros((3, 3, 3), np.uint8))
        assert process(source, tmp_path, settings=SETTINGS, reference=None).outputs
        assert process.pid == pid

    def test_close_ends_the_child(self, process: ConversionProcess) -> None:
        """`close()` lets the child see the end of its input and exit."""
        pid = process.pid
        assert pid is not None
        process.close()
        assert process.pid is None
        assert gone(pid)

    def test_a_child_dies_with_its_parent(self) -> None:
        """kill -9 of the service leaves no conversion process behind."""
        script = textwrap.dedent(
            """
            import time
            from niftidrop.processes import ConversionCrashed, ConversionProcess
            process = ConversionProcess()
            process.start()
            process.wait_ready()
            print(process.pid, flush=True)
            time.sleep(120)
            """
        )
        with subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
        ) as parent:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            assert not gone(child)
            parent.kill()
        wait_until(lambda: gone(child))

    def test_a_child_that_cannot_start_is_reported(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """No handshake (here: a program that exits at once) gives ChildProcessError."""
        monkeypatch.setattr(sys, "executable", "/bin/false")
        process = ConversionProcess()
        process.start()
        with pytest.raises(ChildProcessError, match="exit status 1"):
            process.wait_ready()
        assert process.pid is None


def started(**options: Any) -> ConversionProcess:
    process = ConversionProcess(**options)
    process.start()
    process.wait_ready()
    return process


class Reports:
    """An `on_output` handler that keeps what each child reported."""

    def __init__(self) -> None:
        self.reports: list[Mapping[str, Any]] = []

    def __call__(self, pid: int, report: Mapping[str, Any]) -> None:
        self.reports.append({**report, "from": pid})

    def text(self) -> str:
        return "\n".join(str(report) for report in self.reports)


def huge_npz(path: Path, shape: tuple[int, ...]) -> Path:
    """A small file that decompresses to a large array (zeros compress to nothing)."""
    np.savez_compressed(path, prediction=np.zeros(shape, np.uint8))
    return path


class TestCrashes:
    """What ends a conversion without a result or a rejection is ConversionCrashed."""

    def test_an_unexpected_exception_is_a_crash_and_its_traceback_a_report(
        self, tmp_path: Path
    ) -> None:
        """A bug in the conversion (here: no settings) raises ConversionCrashed naming the
        exception, and the child's traceback reaches `on_output`, not stderr."""
        reports = Reports()
        process = started(on_output=reports)
        source = tmp_path / "case.npy"
        np.save(source, np.zeros((3, 3, 3), np.uint8))
        try:
            with pytest.raises(ConversionCrashed, match="conversion raised AttributeError"):
                process(source, tmp_path, settings=None, reference=None)
            wait_until(lambda: bool(reports.reports))
            (report,) = reports.reports
            assert report["event"] == "conversion_exception"
            assert "Traceback" in report["error"]
            assert report["from"] == process.pid
            assert process(source, tmp_path, settings=SETTINGS, reference=None).outputs
        finally:
            process.close()

    def test_max_memory_turns_a_huge_allocation_into_a_crash(self, tmp_path: Path) -> None:
        """Under `max_memory` a member read whole (for a preview) that decompresses to
        more than it raises ConversionCrashed (MemoryError); the same member streamed,
        and a larger .npy read through its file mapping, still convert."""
        # Room for the streamed conversion's threads and buffers (and a coverage
        # tracer), not for the member whole.
        process = started(max_memory=400 * 1024**2)
        huge = huge_npz(tmp_path / "huge.npz", (512, 512, 2048))  # 512 MiB of voxels
        large = tmp_path / "large.npy"
        np.save(large, np.ones((512, 512, 1024), np.uint8))
        whole = SETTINGS.model_copy(update={"preview": True})
        try:
            with pytest.raises(ConversionCrashed, match="MemoryError"):
                process(huge, tmp_path / "out", settings=whole, reference=None)
            result = process(huge, tmp_path / "out", settings=SETTINGS, reference=None)
            assert result.shape_out == (512, 512, 2048)
            result = process(large, tmp_path / "out", settings=SETTINGS, reference=None)
            assert result.shape_out == (512, 512, 1024)
        finally:
            process.close()

    def test_a_conversion_over_its_time_is_killed(self, tmp_path: Path) -> None:
        """A conversion stuck on a reference that never delivers (a FIFO) is killed
        after `timeout` seconds: ConversionCrashed; the next call gets a new child."""
        process = started(timeout=0.5)
        source = tmp_path / "case.npy"
        np.save(source, np.zeros((3, 3, 3), np.uint8))
        blocking = tmp_path / "reference.nii"
        os.mkfifo(blocking)
        first = process.pid
        assert first is not None
        try:
            with pytest.raises(ConversionCrashed, match=r"killed after 0.5 s \(conversion_timeout"):
                process(source, tmp_path / "out", settings=SETTINGS, reference=blocking)
            assert gone(first)
            assert process(source, tmp_path / "out", settings=SETTINGS, reference=None).outputs
            assert process.pid != first
        finally:
            process.close()

    def test_kill_from_another_thread_ends_the_call_cleanly(self, tmp_path: Path) -> None:
        """`kill()` from another thread while a call waits for its reply (a forced stop)
        ends that call with ConversionCrashed, nothing else (no error from a pipe
        closed under the reader)."""
        for _ in range(5):  # the race it used to lose needs a few tries to show
            process = started()
            raised = interrupted_call(process, tmp_path, lambda _, killed=process: killed.kill())
            process.close()
            assert [type(error) for error in raised] == [ConversionCrashed]
            assert "killed by SIGKILL" in str(raised[0])

    def test_a_fatal_signal_is_reported_with_where_it_struck(self, tmp_path: Path) -> None:
        """A child killed by SIGSEGV: ConversionCrashed naming the signal, and the
        child's own fault report reaches `on_output` as text."""
        reports = Reports()
        process = started(on_output=reports)
        pid = process.pid
        raised = interrupted_call(process, tmp_path, lambda pid: os.kill(pid, signal.SIGSEGV))
        process.close()
        assert [type(error) for error in raised] == [ConversionCrashed]
        assert f"conversion process {pid} ended (killed by SIGSEGV)" in str(raised[0])
        outputs = [report["output"] for report in reports.reports if "output" in report]
        assert any("Segmentation fault" in text for text in outputs), reports.text()


def interrupted_call(
    process: ConversionProcess, folder: Path, interrupt: Callable[[int], None]
) -> list[BaseException]:
    """Call `process` on a conversion that blocks (its reference is a FIFO), call
    `interrupt(child pid)` once the child is in it; what the call raised."""
    source = folder / "case.npy"
    np.save(source, np.zeros((3, 3, 3), np.uint8))
    blocking = folder / "reference.nii"
    blocking.unlink(missing_ok=True)
    os.mkfifo(blocking)
    raised: list[BaseException] = []

    def call() -> None:
        try:
            process(source, folder / "out", settings=SETTINGS, reference=blocking)
        except BaseException as error:
            raised.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    writer = wait_for_reader(
        blocking, timeout=20.0
    )  # the child is in the call, reading the reference
    pid = process.pid
    assert pid is not None
    interrupt(pid)
    caller.join(timeout=20)
    os.close(writer)
    return raised


def assert_second_converted_in_a_new_child(
    outcomes: dict[str, Any], crash: str, process: ConversionProcess, first: int | None
) -> None:
    """The first call crashed (`crash` in its message); the second, queued behind
    it, converted in a child other than `first`."""
    assert isinstance(outcomes["first"], ConversionCrashed)
    assert crash in str(outcomes["first"])
    assert outcomes["second"].outputs[0].name == "second.nii.gz"
    assert process.pid not in (None, first)


class TestCallsInFlight:
    """Calls from several threads at once queue in the child's pipe and convert in turn."""

    def queued_behind_a_blocked_call(
        self, process: ConversionProcess, folder: Path, second_reference: Path | None = None
    ) -> tuple[dict[str, Any], list[threading.Thread], int]:
        """A first call blocked on a FIFO reference and a second queued behind it
        (with `second_reference`); what each returned or raised (by name), the
        callers, the FIFO's writer."""
        outcomes: dict[str, Any] = {}
        blocking = folder / "reference.nii"
        os.mkfifo(blocking)

        def call(name: str, reference: Path | None) -> None:
            source = folder / f"{name}.npy"
            np.save(source, np.zeros((3, 3, 3), np.uint8))
            try:
                outcomes[name] = process(
                    source, folder / "out", settings=SETTINGS, reference=reference
                )
            except BaseException as error:
                outcomes[name] = error

        first = threading.Thread(target=call, args=("first", blocking))
        first.start()
        writer = wait_for_reader(blocking, timeout=20.0)
        second = threading.Thread(target=call, args=("second", second_reference))
        second.start()
        wait_until(lambda: len(process._requests) == 2, what="the second call to be queued")
        return outcomes, [first, second], writer

    def test_each_call_gets_its_own_reply_in_turn(self, tmp_path: Path) -> None:
        """The queued call waits for the blocked one; then each has its own outcome,
        also when both replies are in the pipe before the first is read."""
        process = started(timeout=10.0)
        try:
            outcomes, callers, writer = self.queued_behind_a_blocked_call(process, tmp_path)
            assert outcomes == {}
            os.close(writer)  # an empty reference: the first call is rejected
            # Hold the interpreter lock (a loop in C) while the child replies to
            # both, so that the callers find both replies in the pipe at once.
            sum(range(50_000_000))
            for caller in callers:
                caller.join(timeout=30)
        finally:
            process.close()
        assert isinstance(outcomes["first"], ConversionError)
        assert outcomes["second"].outputs[0].name == "second.nii.gz"

    def test_a_call_queued_behind_a_crash_is_sent_to_the_new_child(
        self, process: ConversionProcess, tmp_path: Path
    ) -> None:
        """The child dies in the first call: that one crashed; the queued one never
        started, so it converts in the next child instead of failing."""
        outcomes, callers, writer = self.queued_behind_a_blocked_call(process, tmp_path)
        first = process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for caller in callers:
            caller.join(timeout=30)
        os.close(writer)
        assert_second_converted_in_a_new_child(outcomes, "SIGKILL", process, first)

    def test_kill_ends_every_call_in_flight(
        self, process: ConversionProcess, tmp_path: Path
    ) -> None:
        """`kill()` (a forced stop) abandons the queued call too: it is not sent again."""
        outcomes, callers, writer = self.queued_behind_a_blocked_call(process, tmp_path)
        process.kill()
        for caller in callers:
            caller.join(timeout=30)
        os.close(writer)
        assert [type(outcomes[name]) for name in ("first", "second")] == [ConversionCrashed] * 2

    def test_a_call_queued_behind_a_timeout_converts_in_the_new_child(self, tmp_path: Path) -> None:
        """The first call runs over `timeout` and its child is killed; the queued
        one never started, so it converts in the next child."""
        process = started(timeout=1.0)
        try:
            outcomes, callers, writer = self.queued_behind_a_blocked_call(process, tmp_path)
            first = process.pid
            for caller in callers:
                caller.join(timeout=30)
            os.close(writer)
            assert_second_converted_in_a_new_child(
                outcomes, "killed after 1 s (conversion_timeout)", process, first
            )
        finally:
            process.close()

    def test_a_queued_call_has_its_whole_timeout_from_its_turn(self, tmp_path: Path) -> None:
        """Queued behind a call of 2 s, a call of 1.5 s is not killed at 3 s: its
        time runs from its turn, not from when it was sent."""
        process = started(timeout=3.0)
        try:
            later = tmp_path / "later.nii"
            os.mkfifo(later)
            outcomes, callers, writer = self.queued_behind_a_blocked_call(
                process, tmp_path, second_reference=later
            )
            time.sleep(2.0)
            os.close(writer)  # the first call ends (rejected: an empty reference)
            second = wait_for_reader(later, timeout=20.0)
            time.sleep(1.5)
            os.close(second)
            for caller in callers:
                caller.join(timeout=30)
            assert [type(outcomes[name]) for name in ("first", "second")] == [ConversionError] * 2
        finally:
            process.close()

    def test_many_calls_from_three_threads_each_get_their_own_reply(
        self, process: ConversionProcess, tmp_path: Path
    ) -> None:
        """Three threads, as in the service, call one process 60 times each with
        small inputs while a fourth keeps the interpreter busy: every call gets
        the result of its own input, in the order each thread made them."""
        results: dict[str, list[str]] = {}
        done = threading.Event()

        def busy() -> None:
            while not done.is_set():
                sum(range(10_000))

        def calls(thread: str) -> None:
            results[thread] = []
            for number in range(60):
                source = tmp_path / f"{thread}_{number}.npy"
                np.save(source, np.full((4, 4, 4), number, np.uint8))
                result = process(source, tmp_path / "out", settings=SETTINGS, reference=None)
                results[thread].append(result.outputs[0].name)

        callers = [threading.Thread(target=calls, args=(name,)) for name in "abc"]
        spinner = threading.Thread(target=busy)
        for thread in [spinner, *callers]:
            thread.start()
        for caller in callers:
            caller.join(timeout=60)
        done.set()
        spinner.join()
        assert not any(caller.is_alive() for caller in callers)
        assert results == {
            thread: [f"{thread}_{number}.nii.gz" for number in range(60)] for thread in "abc"
        }


class TestMessages:
    """The messages on the child's pipes."""

    def test_receive_takes_exactly_one_message_off_the_pipe(self) -> None:
        """Two messages in the pipe: receiving the first leaves the second in the
        pipe itself, where a poll sees it (not in a buffer of the reader)."""
        reader, writer = os.pipe()
        with os.fdopen(reader, "rb", buffering=0) as replies:
            with os.fdopen(writer, "wb") as requests:
                send(requests, pickle.dumps(("ok", 1)))
                send(requests, pickle.dumps(("ok", "two" * 10_000)))
            assert receive(replies) == ("ok", 1)
            poller = select.poll()
            poller.register(replies.fileno(), select.POLLIN)
            assert poller.poll(0)
            assert receive(replies) == ("ok", "two" * 10_000)
            with pytest.raises(EOFError):
                receive(replies)

    def test_a_message_cut_short_is_an_end_of_the_pipe(self) -> None:
        """A child that dies in the middle of a reply: EOFError, not a partial value."""
        reader, writer = os.pipe()
        with os.fdopen(reader, "rb", buffering=0) as replies:
            with os.fdopen(writer, "wb") as requests:
                message = io.BytesIO()
                send(message, pickle.dumps(("ok", list(range(100)))))
                requests.write(message.getvalue()[:-5])
            with pytest.raises(EOFError, match="bytes into a message"):
                receive(replies)
