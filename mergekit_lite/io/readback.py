"""Reading a release's shards back once: the tensors for the gate's checks and each file's SHA-256,
from the same bytes.

The gate checks every tensor of a candidate release against the base and the adapters; the release's
SHA256SUMS and release.json need the digest of every shard. Reading the shards once for both halves
the disk traffic of a gated merge's read-back and of `verify`, and makes the recorded digests those
of the bytes on disk that the checks saw, not of the bytes the merge meant to write: a byte changed
between the write and the read-back is either caught by the checks or is in the digest.

`HashedReads` wraps a TensorReader of the candidate. Tensors are asked for in file order (the
gate goes through the plan, whose order is the shards' own); every byte of a file between the
tensors it hands out (the header, anything the plan does not name) is read and hashed on the way,
and `finish` hashes what follows the last one. A tensor read into a buffer is hashed from it at
once; a mapped one (the largest tensors) once its user is done with it (`hash_mapped`): hashing
it when mapped would bring its pages into memory while the previous tensor's are still there. A
file read out of order gets no digest (the caller then hashes it whole: correct, only slower).

With `ready`, the shards are read while the merge writes them (the gate's checks in flight):
`ready(path, end)` returns once the bytes [0, end) of `path` are written (end None: once the file is
complete), so each tensor is read back from the file as soon as its bytes are there.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from mergekit_lite.io.format import TensorEntry
from mergekit_lite.io.reader import ALIGN, AlignedBuffer, TensorReader, pread_fully

GAP_CHUNK = 8 * 2**20  # bytes read at a time between tensors (headers, mostly)


class _FileHash:
    """The SHA-256 of one file's bytes [0, position), or None once its bytes came out of order."""

    def __init__(self) -> None:
        self.sha256: hashlib._Hash | None = hashlib.sha256()
        self.position = 0
        self.pending: str | None = None  # a mapped tensor handed out, its bytes not hashed yet
        self.lock = threading.Lock()


class HashedReads:
    """The candidate's tensors, read through `reader` (load_into, get, locate as TensorReader has
    them), each file's bytes hashed once as they are read. One tensor at a time per file."""

    def __init__(
        self, entries: dict[str, TensorEntry], ready: Callable[[Path, int | None], None] | None = None
    ) -> None:
        self.reader = TensorReader(entries)
        self.ready = ready or (lambda path, end: None)
        self.files: dict[Path, _FileHash] = {}
        for entry in entries.values():
            self.files.setdefault(entry.file, _FileHash())
        self.bytes_read = 0  # bytes of the files read by this object, tensors and gaps together

    def locate(self, name: str) -> TensorEntry:
        return self.reader.locate(name)

    def load_into(self, name: str, buffer: AlignedBuffer, direct: bool = False) -> torch.Tensor:
        """TensorReader.load_into, the bytes read hashed into their file's digest."""
        entry = self.reader.locate(name)
        self.ready(entry.file, entry.begin + entry.nbytes)
        tensor = self.reader.load_into(name, buffer, direct)
        start = entry.begin // ALIGN * ALIGN  # where load_into's buffer starts in the file
        self.bytes_read += entry.begin + entry.nbytes - start
        if entry.quant is None:
            self._hash(entry, lambda first: buffer.memory[first - start : entry.begin + entry.nbytes - start], start)
        else:
            self._spoil(entry.file)
        return tensor

    def get(self, name: str) -> torch.Tensor:
        """TensorReader.get: a mapping, whose pages are read when first touched. Its bytes are hashed
        by `hash_mapped`, to be called once the caller has used it (its pages are then in memory, and
        hashing them adds none); the file gets no digest if another read of it comes first."""
        entry = self.reader.locate(name)
        self.ready(entry.file, entry.begin + entry.nbytes)
        tensor = self.reader.map(name)  # no header parsed: the file may still be being written
        state = self.files.setdefault(entry.file, _FileHash())
        with state.lock:
            if state.pending is not None or entry.quant is not None:
                state.sha256 = None
            state.pending = name
        return tensor

    def hash_mapped(self, name: str, tensor: torch.Tensor) -> None:
        """Hash the bytes of `tensor`, as `get(name)` returned it, into its file's digest."""
        entry = self.reader.locate(name)
        state = self.files[entry.file]
        with state.lock:
            if state.pending != name:
                state.sha256 = None
                return
            state.pending = None
        self.bytes_read += entry.nbytes
        flat = tensor.reshape(-1).view(torch.uint8)
        self._hash(entry, lambda first: flat[first - entry.begin :], entry.begin)

    def _hash(self, entry: TensorEntry, held, held_from: int) -> None:
        """Hash the file's bytes up to the end of `entry`: those before `held_from` read here, the rest
        from `held(first)`, the bytes [first, end of entry) already in memory."""
        state = self.files.setdefault(entry.file, _FileHash())
        with state.lock:
            if state.sha256 is None:
                return
            if (
                entry.begin < state.position or state.pending is not None
            ):  # out of order or overlapping: no digest from this read
                state.sha256 = None
                return
            if state.position < held_from:
                self._hash_range(entry.file, state, held_from)
            data = held(state.position)
            state.sha256.update(memoryview(data.contiguous().numpy()))
            state.position = entry.begin + entry.nbytes

    def _hash_range(self, path: Path, state: _FileHash, end: int) -> None:
        """Read and hash the file's bytes [state.position, end)."""
        chunk = bytearray(min(GAP_CHUNK, end - state.position))
        view = memoryview(chunk)
        fd = os.open(path, os.O_RDONLY)
        try:
            while state.position < end:
                n = min(len(chunk), end - state.position)
                pread_fully(fd, view, state.position, n, ended=f"`{path}` ended early while read back")
                state.sha256.update(view[:n])
                state.position += n
                self.bytes_read += n
        finally:
            os.close(fd)

    def _spoil(self, path: Path) -> None:
        state = self.files.setdefault(path, _FileHash())
        with state.lock:
            state.sha256 = None

    def finish(self) -> dict[Path, str]:
        """Hash what is left of each file after its last tensor; {file: hex SHA-256} of every file
        read in order. A file that changed size or could not be read gets no digest."""
        found = {}
        for path, state in self.files.items():
            self.ready(path, None)
            with state.lock:
                if state.sha256 is None or state.pending is not None:
                    continue
                try:
                    size = os.stat(path).st_size
                    if state.position <= size:
                        self._hash_range(path, state, size)
                        found[path] = state.sha256.hexdigest()
                except OSError:
                    pass
                state.sha256 = None  # finished: a second call hashes nothing twice
        return found
