"""Lazy readers: one base tensor at a time (safe_open), adapter factors on demand."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_lite.stformat import TensorEntry


class TensorReader:
    """Reads tensors from safetensors files, keeping only the most recently used file open."""

    def __init__(self, entries: dict[str, TensorEntry]) -> None:
        self.entries = entries
        self._path: Path | None = None
        self._handle = None

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, as stored (memory-mapped until it is copied or converted)."""
        entry = self.entries[name]
        if self._path != entry.file:
            self.close()
            self._handle = safe_open(str(entry.file), framework="pt")
            self._path = entry.file
        assert self._handle is not None
        return self._handle.get_tensor(name)

    def raw_chunks(self, name: str, chunk: int) -> Iterator[bytes]:
        """The stored bytes of `name`, in chunks of at most `chunk` bytes, read with pread."""
        entry = self.entries[name]
        fd = os.open(entry.file, os.O_RDONLY)
        try:
            done = 0
            while done < entry.nbytes:
                data = os.pread(fd, min(chunk, entry.nbytes - done), entry.begin + done)
                if not data:
                    raise OSError(f"`{entry.file}` ended early while reading `{name}`")
                done += len(data)
                yield data
        finally:
            os.close(fd)

    def close(self) -> None:
        self._handle = None
        self._path = None
