"""The safetensors file format, parsed strictly from the header alone.

The reference reader tolerates things a release must not contain (duplicate keys, for one), so
mergekit-lite reads headers itself before any tensor data is touched, and writes them itself.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_lite.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation caps it at 100 MB too

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# The float dtypes, as config.json (and torch) name them; LoRA changes only these.
TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
FLOAT_DTYPES = frozenset(TORCH_NAMES)
# every dtype an output may have, as torch names it (an FP8 release's weights: float8_e4m3fn)
DTYPE_NAMES = {**TORCH_NAMES, "F8_E4M3": "float8_e4m3fn"}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Quantized:
    """How a quantized tensor's values are made from stored tensors (io/dequant.py does it).

    `method` is one of io/dequant.METHODS; `parts` are the stored tensors by role (the packed
    weight, its scales, ...), `params` the quantizer's settings (block size, code name, ...).
    """

    method: str
    parts: tuple[tuple[str, TensorEntry], ...]
    params: tuple[tuple[str, int | float | str], ...] = ()

    def part(self, role: str) -> TensorEntry:
        return dict(self.parts)[role]

    def param(self, key: str) -> int | float | str:
        return dict(self.params)[key]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are, what they mean.

    A dequantized tensor (`quant` set) is stored as several others: dtype and shape are those of
    its values, nbytes their size, and file and begin those of its packed weight.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute offset in the file
    nbytes: int
    quant: Quantized | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    file: Path
    tensors: dict[str, TensorEntry]  # in file order
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: Path) -> Header:
    """Parse and validate the header of `path`; read no tensor data."""
    where = f"`{path}`"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO or a device
            raise CheckpointError(f"{where} is not a regular file")
        fh = open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{where} does not exist") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise CheckpointError(f"{where} cannot be read: {exc}") from None
    with fh:
        st = os.fstat(fh.fileno())  # the file opened, not the one stat saw, should the name be swapped
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{where} is not a regular file")
        size = st.st_size
        if size < 8:
            raise CheckpointError(f"{where} is not a safetensors file: {size} bytes, too short for a header length")
        n = int.from_bytes(fh.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise CheckpointError(f"{where} is truncated: header of {n} bytes but the file has {size}")
        raw = fh.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except DuplicateKey as exc:
        raise CheckpointError(f"{where}: duplicate tensor name `{_shown(exc.args[0])}` in the header") from None
    except ValueError as exc:  # bad UTF-8, bad JSON, or an integer of more than 4300 digits
        raise CheckpointError(f"{where}: header is not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: header is not a safetensors header (JSON nested too deeply)") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{where}: `__metadata__` must map strings to strings")
    odd = next((name for name in doc if not name.isprintable()), None)
    if odd is not None:
        raise CheckpointError(f"{where}: tensor name {_shown(odd)} holds control characters")
    data_start = 8 + n
    entries = [_entry(path, name, info, data_start) for name, info in doc.items()]
    entries.sort(key=lambda e: e.begin)
    cursor = data_start
    for entry in entries:
        if entry.begin != cursor:
            kind = "overlaps the previous tensor" if entry.begin < cursor else "leaves a gap before it"
            raise CheckpointError(f"{where}: tensor `{entry.name}` {kind} (offset {entry.begin - data_start})")
        cursor += entry.nbytes
    if cursor != size:
        problem = "is truncated" if cursor > size else f"has {size - cursor} trailing bytes"
        raise CheckpointError(f"{where} {problem}: the header accounts for {cursor} bytes, the file has {size}")
    return Header(path, {e.name: e for e in entries}, dict(metadata), data_start, size)


def _entry(path: Path, name: str, info: object, data_start: int) -> TensorEntry:
    where = f"`{path}`: tensor `{name}`"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where} must have exactly `dtype`, `shape` and `data_offsets`")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {repr(dtype)[:40]}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
        raise CheckpointError(f"{where} has an invalid shape {repr(shape)[:80]}")
    size = 1
    for d in [*shape, ITEMSIZE[dtype]]:  # as the reference reader counts: every partial product fits in 64 bits
        size *= d
        if size >= 2**64:
            raise CheckpointError(f"{where}: shape {repr(shape)[:80]} overflows 64 bits")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{where} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(f"{where} spans {offsets[1] - offsets[0]} bytes but {dtype} {shape} needs {expected}")
    return TensorEntry(name, dtype, tuple(shape), path, data_start + offsets[0], expected)


def _shown(name: str) -> str:
    """A name from a header as it can be shown on one line."""
    return name if name.isprintable() else repr(name)[:80]


class DuplicateKey(Exception):
    """A JSON object names the same key twice (raised by `no_duplicates`)."""


def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads object_pairs_hook that refuses a key given twice (json keeps the last silently)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def layout(
    path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> dict[str, TensorEntry]:
    """The tensor table read_header gives for the file at `path` once a writer has written these
    tensors, in this order, under encode_header(entries, metadata): known before its first byte."""
    start = len(encode_header(entries, metadata))
    return {
        name: TensorEntry(name, dtype, tuple(shape), path, start + begin, end - begin)
        for name, dtype, shape, begin, end in _spans(entries)
    }


def _spans(entries: list[tuple[str, str, tuple[int, ...]]]) -> Iterator[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, dtype, shape, first byte, end) of each tensor in the data section, written in this order."""
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        yield name, dtype, shape, offset, offset + nbytes
        offset += nbytes


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The bytes of a safetensors header (length prefix included) for tensors written in this order."""
    doc: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    for name, dtype, shape, begin, end in _spans(entries):
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw
