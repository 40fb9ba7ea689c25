"""Gzip streams in fixed-size blocks: standard, deterministic, overlapped, failing cleanly."""

from __future__ import annotations

import errno
import gzip
import io
import itertools
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from niftidrop.gzip_blocks import BLOCK_BYTES, GzipBlockWriter, gzip_header

# Smooth enough to compress, irregular enough that a misplaced byte shows.
DATA = (np.sin(np.arange(3 * BLOCK_BYTES + 12345) / 50.0) * 100).astype(np.int8).tobytes()


def gzipped(chunks: list[bytes], *, level: int = 1, threads: int = 2, copy: bool = False) -> bytes:
    """The stream `GzipBlockWriter` writes for `chunks`."""
    raw = io.BytesIO()
    with GzipBlockWriter(raw, level=level, threads=threads) as stream:
        if copy:
            for chunk in chunks:
                stream.write(chunk)
        else:
            stream.write_chunks(chunks)
    return raw.getvalue()


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class TestStandardGzip:
    @pytest.mark.parametrize("level", [0, 1, 2, 3])
    def test_every_level_gives_a_stream_gzip_reads(self, level: int) -> None:
        """At each ISA-L level the stream decompresses to the data, CRC and size checked."""
        assert gzip.decompress(gzipped([DATA], level=level)) == DATA

    def test_gzip_tool_accepts_it(self, tmp_path: Path) -> None:
        """`gzip -t` (another implementation) finds the stream valid."""
        path = tmp_path / "a.gz"
        path.write_bytes(gzipped([DATA], threads=3))
        subprocess.run(["gzip", "-t", str(path)], check=True)

    def test_empty_stream(self) -> None:
        """No data gives a valid gzip stream of nothing."""
        assert gzip.decompress(gzipped([])) == b""
        assert gzip.decompress(gzipped([b"", b""])) == b""

    def test_level_0_random_data_fits(self) -> None:
        """Incompressible data at level 0 (which grows it) is still written whole."""
        noise = np.random.default_rng(3).bytes(2 * BLOCK_BYTES + 7)
        assert gzip.decompress(gzipped([noise], level=0)) == noise

    def test_header_has_no_name_and_no_time(self) -> None:
        """The header is fixed: deflate, no flags, mtime 0, OS unknown."""
        stream = gzipped([DATA])
        assert stream[:10] == gzip_header(1) == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
        assert gzip_header(0)[8] == 4  # XFL: fastest


class TestDeterministic:
    @settings(max_examples=40, deadline=None)
    @given(
        cuts=st.lists(st.integers(min_value=0, max_value=len(DATA)), max_size=12),
        threads=st.integers(min_value=1, max_value=4),
        copy=st.booleans(),
    )
    def test_same_bytes_whatever_the_chunks_and_threads(
        self, cuts: list[int], threads: int, copy: bool
    ) -> None:
        """The bytes depend only on the data: any cut into chunks, any thread count, copied
        or not, gives the stream of the data in one piece on one thread."""
        expected = gzipped([DATA], threads=1)
        assert gzipped(cut(DATA, cuts), threads=threads, copy=copy) == expected

    def test_small_chunks_spanning_blocks(self) -> None:
        """Chunks far smaller than a block (a block made of many of them) change nothing."""
        pieces = [DATA[i : i + 1000] for i in range(0, len(DATA), 1000)]
        assert gzipped(pieces, threads=3) == gzipped([DATA], threads=1)


class TestOverlap:
    def test_a_chunk_is_read_only_until_the_one_after_next_is_asked_for(self) -> None:
        """Two buffers taking turns, each overwritten with garbage when its chunk's time is
        up: the stream still holds the data, so no thread read a chunk past its rule."""
        chunk_bytes = 3 * BLOCK_BYTES + 1000  # blocks inside chunks and across them
        data = (DATA * 4)[: 12 * chunk_bytes]
        buffers = [bytearray(chunk_bytes), bytearray(chunk_bytes)]

        def chunks() -> Iterator[memoryview]:
            for number, start in enumerate(range(0, len(data), chunk_bytes)):
                buffer = buffers[number % 2]
                buffer[:] = b"\xaa" * chunk_bytes  # the garbage a late reader would see
                buffer[:] = data[start : start + chunk_bytes]
                yield memoryview(buffer)

        raw = io.BytesIO()
        with GzipBlockWriter(raw, level=1, threads=4) as stream:
            stream.write_chunks(chunks())
        assert gzip.decompress(raw.getvalue()) == data


class FailingFile(io.RawIOBase):
    """A file whose writes fail with ENOSPC once `room` bytes were written."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        size = memoryview(data).nbytes  # type: ignore[arg-type]
        if size > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return size


class TestFailures:
    @pytest.mark.parametrize("threads", [1, 3])
    def test_a_write_error_reaches_the_caller_as_it_is(self, threads: int) -> None:
        """A full disk while a thread writes a block is raised to the caller (same errno),
        and the threads end."""
        before = threading.active_count()
        with (
            pytest.raises(OSError, match="No space") as raised,
            GzipBlockWriter(FailingFile(50_000), level=1, threads=threads) as stream,
        ):
            stream.write_chunks([DATA, DATA])
        assert raised.value.errno == errno.ENOSPC
        assert threading.active_count() == before

    def test_an_error_of_the_producer_stops_the_threads(self) -> None:
        """An exception while the chunks are produced propagates; no thread is left."""
        before = threading.active_count()

        def chunks() -> Iterator[bytes]:
            yield DATA
            raise ValueError("late overflow")

        with (
            pytest.raises(ValueError, match="late overflow"),
            GzipBlockWriter(io.BytesIO(), level=1, threads=3) as stream,
        ):
            stream.write_chunks(chunks())
        assert threading.active_count() == before
