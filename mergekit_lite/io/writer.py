"""A streaming safetensors writer: the header is fixed up front, tensors follow one at a time."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import TracebackType

import torch

from mergekit_lite.errors import MergeError
from mergekit_lite.io.format import ITEMSIZE, NAMES, encode_header
from mergekit_lite.io.reader import ALIGN, aligned, pread_fully, set_direct

STAGING = 16 * 2**20  # bytes gathered before each write to the file
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# errors with which copy_file_range says "not here" (another filesystem, an old kernel), not "failed"
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_START_WRITEBACK = _sync_file_range()  # a libc function, looked up once; not state
# SHA-256 runs at about the speed of the direct writes on one core: a thread of its own lets the
# two overlap (hashlib and pwrite both release the GIL). Shared by all writers; it holds no state.
_HASHER = ThreadPoolExecutor(1, "mergekit-sha256")
_SYNC_FILE_RANGE_WRITE = 2


class Abandoned(Exception):
    """The merge stopped before the bytes waited for were written."""


class Written:
    """How far each file has been written, for readers that follow the writers (the gate's checks in
    flight): `wait(path, end)` returns once the bytes [0, end) of `path` have been written (end None:
    once the file is complete, fsync'd and closed), or raises Abandoned when the merge stops first.

    Bytes count as written when the write that carries them has returned: from then on a read of the
    file, direct or through the page cache, gets them. Writers report from their own thread."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._offsets: dict[Path, int] = {}
        self._closed: set[Path] = set()
        self._over = False  # the merge has stopped (done or failed): nothing more will be written
        self._cancelled = False  # the readers are to give up, bytes written or not

    def advance(self, path: Path, offset: int) -> None:
        with self._changed:
            self._offsets[path] = offset
            self._changed.notify_all()

    def close(self, path: Path) -> None:
        with self._changed:
            self._closed.add(path)
            self._changed.notify_all()

    def stop(self) -> None:
        """No more writes are coming (the merge ended, or failed): waiters of bytes not written give up."""
        with self._changed:
            self._over = True
            self._changed.notify_all()

    def cancel(self) -> None:
        """The run is over (an error, a signal): every wait, now or to come, gives up."""
        with self._changed:
            self._over = self._cancelled = True
            self._changed.notify_all()

    def wait(self, path: Path, end: int | None) -> None:
        with self._changed:
            if self._cancelled:
                raise Abandoned("the run stopped")
            while not (path in self._closed if end is None else self._offsets.get(path, 0) >= end):
                if self._over:
                    raise Abandoned(f"`{path.name}` was not written" + ("" if end is None else f" up to byte {end}"))
                self._changed.wait()


class ShardWriter:
    """Writes one safetensors file whose tensors, dtypes and shapes are known before the first byte.

    Bytes are gathered in a block-aligned staging buffer and written with direct I/O where the
    filesystem allows it: they go from this buffer to the disk with no copy into the page cache
    and none of the kernel's per-page work, which on a 2-core machine costs as much CPU as the
    merge math (figures: docs/performance.md). The price: the shards are not left
    in the page cache, so a later reader of them (a checksum, the gate) reads them from disk.
    Elsewhere the writes are buffered and the kernel is asked to start writing them back at once
    (flush-behind), so that the fsync in `close` has little left to wait for.

    The staging buffer is a torch tensor so that copies into it run without the GIL, which the
    merge's threads need. With `digest`, the SHA-256 of the file is kept as its bytes go out; with
    `written`, each write is reported there once it has returned, and the close once fsync'd.
    One thread at a time may use a writer.
    """

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str],
        digest: bool = False,
        written: Written | None = None,
    ) -> None:
        self.path = path
        self.written = written
        self.sha256 = hashlib.sha256() if digest else None  # of the file, as its bytes go out
        self.entries = entries
        self.position = 0
        self.offset = 0  # bytes in the file so far: where the staging buffer starts
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o666)
        self.direct = set_direct(self.fd, True)
        # With a digest, two staging buffers: one is filled while the other's bytes are still being hashed
        self.buffers = [aligned(STAGING) for _ in range(2 if digest else 1)]
        self.hashing: list[Future[None] | None] = [None] * len(self.buffers)  # each buffer's hash in progress
        self.turn = 0
        self.staging = self.buffers[0]  # the buffer being filled, block-aligned
        self.view = memoryview(self.staging.numpy())  # the same bytes, for the system calls
        self.filled = 0  # bytes waiting in the staging buffer
        self._stage(torch.frombuffer(bytearray(encode_header(entries, metadata)), dtype=torch.uint8))

    def _next(self, name: str) -> tuple[str, int]:
        if self.position >= len(self.entries):
            raise MergeError(f"internal error: `{name}` written past the end of `{self.path.name}`")
        expected, dtype, shape = self.entries[self.position]
        if name != expected:
            raise MergeError(f"internal error: `{name}` written where `{expected}` belongs in `{self.path.name}`")
        self.position += 1
        nbytes = ITEMSIZE[dtype]
        for d in shape:
            nbytes *= d
        return dtype, nbytes

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor, which must have the planned dtype and shape."""
        dtype, nbytes = self._next(name)
        expected_shape = self.entries[self.position - 1][2]
        if NAMES.get(tensor.dtype) != dtype or tuple(tensor.shape) != expected_shape:
            raise MergeError(
                f"internal error: `{name}` is {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(expected_shape)}"
            )
        self._stage(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))

    def write_raw(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        """Write the next tensor from raw little-endian bytes (a byte-for-byte copy)."""
        _, nbytes = self._next(name)
        written = 0
        for chunk in chunks:
            if len(chunk):
                self._stage(torch.frombuffer(bytearray(chunk), dtype=torch.uint8))
            written += len(chunk)
        if written != nbytes:
            raise MergeError(f"`{name}`: copied {written} bytes, expected {nbytes}")

    def copy_range(self, name: str, source: Path, offset: int, nbytes: int) -> None:
        """Write the next tensor as a byte-for-byte copy of `nbytes` bytes of `source` from `offset`.

        With direct I/O (or a digest to keep) the bytes are read straight into the staging buffer;
        with buffered writes the kernel copies file to file (copy_file_range) where it can.
        """
        _, expected = self._next(name)
        if nbytes != expected:
            raise MergeError(f"internal error: `{name}` is {nbytes} bytes in `{source}`, planned {expected}")
        src = os.open(source, os.O_RDONLY | _CLOEXEC)
        try:
            done = 0
            if not self.direct and self.sha256 is None:
                self._write_out(final=True)
                done = _kernel_copy(src, self.fd, offset, self.offset, nbytes)
                self.offset += done
                self._report()
            while done < nbytes:
                if self.filled == STAGING:
                    self._write_out()
                room = self.view[self.filled : self.filled + min(STAGING - self.filled, nbytes - done)]
                pread_fully(src, room, offset + done, len(room), ended=f"`{source}` ended early while copying `{name}`")
                self.filled += len(room)
                done += len(room)
        finally:
            os.close(src)

    def _stage(self, data: torch.Tensor) -> None:
        """Append bytes (a flat uint8 tensor) to the staging buffer, writing it out each time it fills."""
        done = 0
        while done < len(data):
            n = min(len(data) - done, STAGING - self.filled)
            self.staging[self.filled : self.filled + n].copy_(data[done : done + n])
            self.filled += n
            done += n
            if self.filled == STAGING:
                self._write_out()

    def _write_out(self, final: bool = False) -> None:
        """Write the staged bytes: all of them when `final`, else the whole blocks among them.

        With a digest, the bytes are hashed on the hashing thread while they are written, and go on
        being hashed while the other staging buffer is filled: the hash, the slowest of the three
        (hash, direct write, copy), never waits for a copy.
        """
        end = self.filled if final or not self.direct else self.filled // ALIGN * ALIGN
        if final and self.direct and end % ALIGN:
            self.direct = set_direct(self.fd, False)  # the last partial block goes through the page cache
        data = self.view[:end]
        hashed = _HASHER.submit(self.sha256.update, data) if self.sha256 is not None and end else None
        self.hashing[self.turn] = hashed
        self._write_at_end(data)
        following = (self.turn + 1) % len(self.buffers)
        self._wait_hash(following)  # its bytes are hashed before it is filled again
        left = self.filled - end  # a partial block (shorter than `end`), moved to the front of the next buffer
        if left:
            self.buffers[following][:left].copy_(self.staging[end : self.filled])
        self.turn, self.filled = following, left
        self.staging = self.buffers[following]
        self.view = memoryview(self.staging.numpy())

    def _wait_hash(self, index: int) -> None:
        hashed, self.hashing[index] = self.hashing[index], None
        if hashed is not None:
            hashed.result()

    def _write_at_end(self, data: memoryview) -> None:
        start, done = self.offset, 0
        while done < len(data):
            try:
                done += os.pwrite(self.fd, data[done:], start + done)
            except OSError as exc:  # a filesystem that takes O_DIRECT but not these writes
                if not self.direct or exc.errno != errno.EINVAL:
                    raise
                self.direct = set_direct(self.fd, False)
            if self.direct and done % ALIGN:
                self.direct = set_direct(self.fd, False)
        self.offset += done
        if not self.direct and _START_WRITEBACK is not None and done:
            _START_WRITEBACK(self.fd, start, done, _SYNC_FILE_RANGE_WRITE)  # advisory: fsync does the rest
        self._report()

    def _report(self) -> None:
        if self.written is not None:
            self.written.advance(self.path, self.offset)

    def close(self) -> None:
        """Write what is staged, fsync and close; refuse to close a shard that is missing tensors."""
        if self.position != len(self.entries):
            missing = self.entries[self.position][0]
            raise MergeError(f"internal error: `{self.path.name}` closed before `{missing}` was written")
        self._write_out(final=True)
        for index in range(len(self.buffers)):
            self._wait_hash(index)
        os.fsync(self.fd)
        self.abort()
        if self.written is not None:
            self.written.close(self.path)

    def abort(self) -> None:
        """Close the file as it is (after an error; the caller removes it). Safe to call twice."""
        for index, hashed in enumerate(self.hashing):  # let the hashing thread finish with our buffers
            if hashed is not None:
                wait([hashed])
                self.hashing[index] = None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _kernel_copy(src: int, dst: int, src_offset: int, dst_offset: int, nbytes: int) -> int:
    """Copy in the kernel; return the bytes copied, fewer than `nbytes` where the filesystem cannot."""
    copy = getattr(os, "copy_file_range", None)
    done = 0
    while copy is not None and done < nbytes:
        try:
            n = copy(src, dst, nbytes - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if exc.errno in _NO_KERNEL_COPY:
                break
            raise
        if n == 0:  # the end of the source file: the copy through the staging buffer reports it
            break
        done += n
    return done
