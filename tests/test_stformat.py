"""The strict safetensors header parser and the header encoder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_lite.errors import CheckpointError
from mergekit_lite.io.format import encode_header, read_header


def raw_file(tmp_path: Path, header: object, data: bytes, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_reads_what_safetensors_writes(tmp_path: Path) -> None:
    tensors = {"b": torch.zeros(3, 2, dtype=torch.bfloat16), "a": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "t.safetensors")
    assert {n: (e.dtype, e.shape) for n, e in header.tensors.items()} == {"a": ("I64", (5,)), "b": ("BF16", (3, 2))}
    assert header.metadata == {"format": "pt"}


def test_encoded_header_is_read_back_by_safetensors(tmp_path: Path) -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    path = tmp_path / "w.safetensors"
    path.write_bytes(encode_header([("w", "F32", (2, 3))], {"format": "pt"}) + t.numpy().tobytes())
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("w").equal(t)
    assert (len(path.read_bytes()) - 8 - 24) % 8 == 0


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        pytest.param(b"", b"", None, "header is not valid JSON", id="empty-header"),
        pytest.param({"w": F32_2}, b"\0" * 8, 2**40, "exceeds the", id="absurd-length"),
        pytest.param({"w": F32_2}, b"", 500, "is truncated: header of 500 bytes", id="truncated-header"),
        pytest.param(b"{not json", b"", None, "header is not valid JSON", id="not-json"),
        pytest.param(
            b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
            b"\0" * 16,
            None,
            "duplicate tensor name `w`",
            id="duplicate",
        ),
        pytest.param({"w": F32_2}, b"\0" * 4, None, "is truncated", id="truncated-data"),
        pytest.param({"w": F32_2}, b"\0" * 12, None, "has 4 trailing bytes", id="trailing"),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "needs 12",
            id="size-mismatch",
        ),
        pytest.param(
            {"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12,
            None,
            "overlaps",
            id="overlap",
        ),
        pytest.param(
            {"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}},
            b"\0" * 20,
            None,
            "gap",
            id="gap",
        ),
        pytest.param(
            {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", None, "unsupported dtype", id="dtype"
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape", id="shape"
        ),
        pytest.param([1, 2], b"", None, "not a JSON object", id="array"),
    ],
)
def test_corrupt_headers_are_refused(tmp_path: Path, header, data: bytes, length: int | None, message: str) -> None:
    path = raw_file(tmp_path, header, data, length)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        read_header(path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="0 bytes, too short"):
        read_header(tmp_path / "e.safetensors")


def test_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_header(tmp_path)
