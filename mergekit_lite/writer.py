"""A streaming safetensors writer: the header is fixed up front, tensors follow one at a time."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import torch

from mergekit_lite.errors import MergeError
from mergekit_lite.stformat import ITEMSIZE, NAMES, encode_header


class ShardWriter:
    """Writes one safetensors file whose tensors, dtypes and shapes are known before the first byte."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> None:
        self.path = path
        self.entries = entries
        self.position = 0
        self.fh = open(path, "xb")
        self.fh.write(encode_header(entries, metadata))

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
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.fh.write(memoryview(data))

    def write_raw(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        """Write the next tensor from raw little-endian bytes (a byte-for-byte copy)."""
        _, nbytes = self._next(name)
        written = 0
        for chunk in chunks:
            self.fh.write(chunk)
            written += len(chunk)
        if written != nbytes:
            raise MergeError(f"`{name}`: copied {written} bytes, expected {nbytes}")

    def close(self) -> None:
        """Flush and fsync; refuse to close a shard that is missing tensors."""
        if self.position != len(self.entries):
            missing = self.entries[self.position][0]
            raise MergeError(f"internal error: `{self.path.name}` closed before `{missing}` was written")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.fh.close()
