"""Lazy readers: one base tensor at a time (safe_open), adapter factors on demand."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open

from mergekit_lite.io.dequant import dequantize
from mergekit_lite.io.format import DTYPES, TensorEntry

ALIGN = 4096  # direct I/O moves whole blocks, at block-aligned offsets, from and to block-aligned memory
DIRECT = getattr(os, "O_DIRECT", 0)


def set_direct(fd: int, on: bool) -> bool:
    """Turn direct I/O on or off for `fd`; return whether it is on (it stays off where unsupported)."""
    if not DIRECT:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | DIRECT if on else flags & ~DIRECT)
    except OSError:
        return False
    return on


def pread_fully(
    fd: int, view: memoryview, offset: int, need: int, *, ended: str, retry: Callable[[OSError], bool] | None = None
) -> None:
    """Read at least `need` bytes from `fd` at `offset` into `view`, however many reads it takes.

    Each read asks for the rest of `view` (direct I/O reads whole blocks, so `view` may be longer
    than `need`). An OSError(`ended`) if the file ends first; an OSError from a read is raised
    unless `retry(error)` says it was dealt with and the read should be tried again.
    """
    done = 0
    while done < need:
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            if retry is None or not retry(exc):
                raise
            continue
        if got == 0:
            raise OSError(ended)
        done += got


class AlignedBuffer:
    """Block-aligned memory for direct-I/O reads, grown as needed and reused."""

    def __init__(self) -> None:
        self.memory = torch.empty(0, dtype=torch.uint8)

    def view(self, nbytes: int) -> memoryview:
        """The first `nbytes` bytes (grown to hold them), for a read system call."""
        if self.memory.numel() < nbytes:
            self.memory = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.memory = aligned(nbytes)
        return memoryview(self.memory.numpy())[:nbytes]


def aligned(nbytes: int) -> torch.Tensor:
    """`nbytes` of block-aligned memory (a torch tensor, so that copies into it run without the GIL)."""
    memory = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    start = -memory.data_ptr() % ALIGN
    return memory[start : start + nbytes]


def read_entry(entry: TensorEntry) -> torch.Tensor:
    """The stored tensor `entry`, read into memory with pread. Raises OSError if the file is
    shorter than its header says."""
    data = torch.empty(entry.nbytes, dtype=torch.uint8)
    fd = os.open(entry.file, os.O_RDONLY)
    try:
        ended = f"`{entry.file}` ended early while reading `{entry.name}`"
        pread_fully(fd, memoryview(data.numpy()), entry.begin, entry.nbytes, ended=ended)
    finally:
        os.close(fd)
    return data.view(DTYPES[entry.dtype]).view(entry.shape)


class TensorReader:
    """Reads one tensor at a time from safetensors files.

    Each read maps the file only for as long as it takes: a handle kept open across a shard lets
    the touched file-backed pages pile up in RSS (more than the shard's size), while a short-lived
    mapping keeps the footprint at the size of the tensor in hand (docs/performance.md).
    """

    def __init__(self, entries: dict[str, TensorEntry]) -> None:
        self.entries = entries

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, as stored.

        safe_open returns it backed by a private (copy-on-write) mapping of the file: pages are
        read when first touched and released with the tensor, and writing to it never reaches the file.
        """
        entry = self.entries[name]
        if entry.quant is not None:
            return dequantize(entry, read_entry)
        with safe_open(str(entry.file), framework="pt") as handle:
            return handle.get_tensor(name)

    def map(self, name: str) -> torch.Tensor:
        """As `get`, mapped by itself: a private mapping of only the tensor's bytes, with no header
        parsed, so that it also serves a file still being written (the gate's checks in flight read
        a tensor as soon as its bytes are there, before the file is complete)."""
        entry = self.entries[name]
        dtype = DTYPES[entry.dtype]
        if entry.quant is not None:
            return self.get(name)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        start = entry.begin // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        with open(entry.file, "rb") as fh:
            mapping = mmap.mmap(fh.fileno(), entry.begin + entry.nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        flat = torch.frombuffer(mapping, dtype=torch.uint8)[entry.begin - start :]  # keeps the mapping alive
        if (entry.begin - start) % dtype.itemsize:
            flat = flat.clone()  # torch views need the element size's alignment
        return flat.view(dtype).view(entry.shape)

    def load(self, name: str) -> torch.Tensor:
        """The tensor `name`, read into memory with pread (no mapping, no header to parse).

        For small tensors read one after the other from a file with a large header, such as an
        adapter's factors: safe_open parses the whole header on every call, which costs a large
        adapter over a tenth of the merge's time (docs/performance.md). Raises OSError if the file is
        shorter than its header says.
        """
        entry = self.entries[name]
        return dequantize(entry, read_entry) if entry.quant is not None else read_entry(entry)

    def load_into(self, name: str, buffer: AlignedBuffer, direct: bool = False) -> torch.Tensor:
        """The tensor `name`, read into `buffer` (reused: the tensor is valid until the buffer's next
        use, and no fresh pages are faulted in for it), with `direct` I/O where the filesystem
        allows it: disk to memory with no page-cache copy. For reading back a file just written with
        direct I/O, whose bytes are on disk only, where buffered reads into new memory spend most
        of their time in the kernel's page-cache work (docs/performance.md).
        """
        entry = self.entries[name]
        if entry.quant is not None:  # made from several stored tensors: not in the buffer
            return dequantize(entry, read_entry)
        start = entry.begin // ALIGN * ALIGN  # direct I/O reads whole blocks at block-aligned offsets
        length = -(-(entry.begin + entry.nbytes - start) // ALIGN) * ALIGN
        view = buffer.view(length)
        direct = direct and bool(DIRECT)
        try:
            fd = os.open(entry.file, os.O_RDONLY | (DIRECT if direct else 0))
        except OSError as exc:  # a filesystem without direct I/O (tmpfs on older kernels)
            if not direct or exc.errno != errno.EINVAL:
                raise
            fd, direct = os.open(entry.file, os.O_RDONLY), False

        def buffered_instead(exc: OSError) -> bool:  # a filesystem that opens with O_DIRECT but refuses the reads
            nonlocal direct
            if not direct or exc.errno != errno.EINVAL:
                return False
            direct = set_direct(fd, False)
            return True

        try:
            ended = f"`{entry.file}` ended early while reading `{name}`"
            pread_fully(fd, view, start, entry.begin + entry.nbytes - start, ended=ended, retry=buffered_instead)
        finally:
            os.close(fd)
        data = buffer.memory[entry.begin - start : entry.begin - start + entry.nbytes]
        return data.view(DTYPES[entry.dtype]).view(entry.shape)

    def locate(self, name: str) -> TensorEntry:
        """Where the stored bytes of `name` are: file, offset and length (for a byte-for-byte copy);
        a dequantized tensor's entry gives its values' size, and its parts (entry.quant) its bytes."""
        return self.entries[name]

    def raw_chunks(self, name: str, chunk: int) -> Iterator[bytes]:
        """The stored bytes of `name`, in chunks of at most `chunk` bytes, read with pread."""
        entry = self.entries[name]
        fd = os.open(entry.file, os.O_RDONLY)
        ended = f"`{entry.file}` ended early while reading `{name}`"
        try:
            done = 0
            while done < entry.nbytes:
                data = bytearray(min(chunk, entry.nbytes - done))
                pread_fully(fd, memoryview(data), entry.begin + done, len(data), ended=ended)
                done += len(data)
                yield bytes(data)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can release readers uniformly."""
