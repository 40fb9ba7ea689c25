"""Gzip streams deflated in fixed-size blocks on a pool of threads (README: Conversion).

A stream is cut into blocks of `BLOCK_BYTES` of its uncompressed data, wherever
the chunks it is given begin and end. Each block is deflated on its own with ISA-L
(primed with the 32 KiB of data before it, ended with a sync flush, as pigz does),
the blocks are written in order and their CRC-32s combined. So a stream's bytes
depend only on its data and level: not on the threads, nor on how the data was cut
into chunks. The header is fixed (no name, mtime 0, as `isal.igzip_threaded`
writes it).

The caller's thread only cuts the data and hands blocks over: a block that lies
inside one chunk is deflated from that chunk's memory, without a copy, while the
caller produces the next chunk (ISA-L releases the interpreter lock). The price is
the one rule of `write_chunks`: a chunk stays valid until the chunk after the next
one is asked for. The threads write the compressed blocks themselves, each block
when its turn comes, so at most one block per thread waits in memory.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Final

import isal.isal_zlib

# isal's functions carry no annotations.
isal_zlib: Any = isal.isal_zlib
Chunk = bytes | bytearray | memoryview
Blocks = list[tuple[Chunk, Chunk]]  # blocks of a stream, each with the window before it

# Uncompressed bytes per block. ISA-L's level 1 codes 128 KiB blocks of float data
# about 6 % smaller than 256 KiB ones, as fast (see the README's Performance), and
# a block and its output stay in the CPU's cache.
BLOCK_BYTES: Final = 128 * 1024
WINDOW_BYTES: Final = 32 * 1024  # deflate's window: what a block is primed with
# Consecutive blocks of one chunk go to a thread together (one task, one turn to
# write), so the interpreter's work per block stays small.
BATCH_BLOCKS: Final = 8
# Tasks handed to the threads and not yet written, at most: enough to keep the
# threads busy while the caller produces a chunk of several MiB.
PENDING_TASKS: Final = 16
# The end of a deflate stream (an empty final block), as isal.igzip_threaded ends it.
_FINAL_BLOCK: Final = bytes(isal_zlib.compress(b"", wbits=-15))
_compressors = threading.local()  # one compressor per thread and level


def gzip_header(level: int) -> bytes:
    """The fixed gzip header: no name, mtime 0, OS unknown; XFL says "fastest" at level 0."""
    return struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, 4 if level == 0 else 0, 0xFF)


def _compressor(level: int) -> Any:
    """This thread's ISA-L block compressor for `level` (its buffers are reused).

    `_ParallelCompress` is the block compressor of python-isal's own threaded gzip
    writer (`isal.igzip_threaded`): deflate with a window, a sync flush, the CRC.
    """
    cached: dict[int, Any] = _compressors.__dict__.setdefault("by_level", {})
    if level not in cached:
        # Room for a block that does not compress (level 0 never stores, so it can
        # grow beyond the input: ISA-L's own bound).
        room = 2 * BLOCK_BYTES + 500 if level == 0 else BLOCK_BYTES + BLOCK_BYTES // 10
        cached[level] = isal_zlib._ParallelCompress(buffersize=room, level=level)
    return cached[level]


class GzipBlockWriter:
    """One gzip stream written to `raw` in blocks, on `threads` threads (1: on the caller's).

    Use as a context manager: `write_chunks` (no copies) or `write` (copies), then a
    clean exit writes the end of the stream. An exception in the `with` body, or one
    raised by writing a block, stops the threads and leaves the stream unfinished.
    """

    def __init__(self, raw: IO[bytes], *, level: int, threads: int) -> None:
        self._raw = raw
        self._level = level
        self._pool = ThreadPoolExecutor(threads, "gzip") if threads > 1 else None
        self._slots = threading.BoundedSemaphore(PENDING_TASKS)
        self._turn_changed = threading.Condition()
        self._turn = 0  # the index of the next task to write
        self._tasks = 0  # tasks handed over so far
        self._stopped = False
        self._error: BaseException | None = None
        self._crc = 0
        self._size = 0
        self._partial = bytearray()  # the start of a block that spans chunks (a copy)
        self._partial_window = b""  # the data before it (a copy)
        self._history = b""  # the stream's last WINDOW_BYTES so far, in a copy
        raw.write(gzip_header(level))

    def __enter__(self) -> GzipBlockWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self._stop()
            return
        self.close()

    def write(self, data: Chunk) -> int:
        """Append a copy of `data` (a file object's `write`, for code that writes to one)."""
        copied = bytes(data)
        self._take(memoryview(copied))
        return len(copied)

    def write_chunks(self, chunks: Iterable[Chunk]) -> None:
        """Append every chunk of `chunks`, deflating each from its own memory.

        A chunk must stay valid until the chunk after the next one is asked for: the
        threads may still read chunk n while chunk n + 1 is produced, never after.
        """
        previous: Future[None] | None = None  # the last task reading the previous chunk
        for chunk in chunks:
            last = self._take(memoryview(chunk).cast("B"))
            if previous is not None:
                # Written in order: when it is done, so is every block before it.
                previous.result()
                self._raise_error()
            previous = last

    def close(self) -> None:
        """Deflate what is left, wait for every block, write the end of the stream."""
        try:
            if self._partial:
                self._submit([(self._partial, self._partial_window)])
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._raise_error()
            self._raw.write(_FINAL_BLOCK)
            self._raw.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        finally:
            self._stop()

    def _stop(self) -> None:
        """Stop the threads: blocks not started are dropped, the others end unwritten."""
        with self._turn_changed:
            self._stopped = True
            self._turn_changed.notify_all()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _take(self, data: memoryview) -> Future[None] | None:
        """Hand `data` over in blocks; returns the last task that reads `data` itself."""
        self._raise_error()
        start, size = 0, data.nbytes
        last: Future[None] | None = None
        if self._partial:
            start = min(size, BLOCK_BYTES - len(self._partial))
            self._partial += data[:start]
            if len(self._partial) == BLOCK_BYTES:
                self._submit([(self._partial, self._partial_window)])
                self._partial = bytearray()
        while size - start >= BLOCK_BYTES:
            batch: Blocks = []
            while size - start >= BLOCK_BYTES and len(batch) < BATCH_BLOCKS:
                batch.append((data[start : start + BLOCK_BYTES], self._window(data, start)))
                start += BLOCK_BYTES
            last = self._submit(batch)
        if start < size:
            self._partial_window = bytes(self._window(data, start))
            self._partial = bytearray(data[start:])
        self._history = bytes(self._window(data, size))
        return last

    def _window(self, data: memoryview, start: int) -> Chunk:
        """The WINDOW_BYTES of the stream before `data[start]`: a view of `data` when it
        holds them all, else a copy that takes the rest from the stream's history."""
        if start >= WINDOW_BYTES:
            return data[start - WINDOW_BYTES : start]
        return (self._history + data[:start])[-WINDOW_BYTES:]

    def _submit(self, blocks: Blocks) -> Future[None] | None:
        """Deflate `blocks` (each with its window) and write them, in their turn."""
        index = self._tasks
        self._tasks += 1
        if self._pool is None:
            self._deflate(index, blocks)
            self._raise_error()
            return None
        self._slots.acquire()
        try:
            return self._pool.submit(self._deflate, index, blocks)
        except BaseException:
            self._slots.release()
            raise

    def _deflate(self, index: int, blocks: Blocks) -> None:
        """Deflate blocks, wait for their turn, write them (on a thread of the pool)."""
        try:
            compressor = _compressor(self._level)
            done = [
                (compressor.compress_and_crc(block, window), len(block)) for block, window in blocks
            ]
            with self._turn_changed:
                while self._turn != index and not self._stopped:
                    self._turn_changed.wait()
                if self._stopped:
                    return
                try:
                    for (compressed, crc), length in done:
                        self._raw.write(compressed)
                        self._crc = isal_zlib.crc32_combine(self._crc, crc, length)
                        self._size += length
                except BaseException as error:
                    self._fail(error)
                    return
                self._turn += 1
                self._turn_changed.notify_all()
        except BaseException as error:
            with self._turn_changed:
                self._fail(error)
        finally:
            if self._pool is not None:
                self._slots.release()

    def _fail(self, error: BaseException) -> None:
        """Keep the first error for the caller; the blocks after it are not written."""
        if self._error is None:
            self._error = error
        self._stopped = True
        self._turn_changed.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
