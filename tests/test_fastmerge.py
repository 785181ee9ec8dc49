"""The row-block merge is bitwise the whole-tensor merge; its threads leave no trace behind."""

from __future__ import annotations

import hashlib
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import mergekit_lite.merge.merge as merge_module
from mergekit_lite.errors import MergeError
from mergekit_lite.io.reader import TensorReader
from mergekit_lite.merge import exact, mathops
from mergekit_lite.pipeline import prepare

from helpers import write_manifest


def _terms(deltas: list[tuple[torch.Tensor, torch.Tensor, float]]) -> list[exact.Term]:
    return [exact.term(lora_b, lora_a, scale) for lora_a, lora_b, scale in deltas]


def _whole(base: torch.Tensor, deltas: list[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype) -> torch.Tensor:
    """The merge of the whole tensor as one block."""
    out = torch.empty(base.shape, dtype=dtype)
    assert exact.merge(base, _terms(deltas), out)
    return out


def _rows(base: torch.Tensor, deltas: list[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype,
          block: int) -> tuple[torch.Tensor, bool]:
    rows, cols = base.shape
    out = torch.empty(base.shape, dtype=dtype)
    ok = exact.merge(base, _terms(deltas), out, mathops.row_blocks(rows, cols, block))
    return out, ok


def _case(rows: int, cols: int, rank: int, adapters: int, src: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=gen) * 0.02).to(src)
    deltas = [(torch.randn(rank, cols, generator=gen) * 0.01, torch.randn(rows, rank, generator=gen) * 0.01, s)
              for s in (2.0, -0.37, 0.6)[:adapters]]
    return base, deltas


@pytest.mark.parametrize("rows,cols", [(1, 300), (2, 4097), (257, 129), (1000, 777), (33, 2048)])
@pytest.mark.parametrize("rank,adapters", [(8, 1), (16, 2), (64, 1)])
@pytest.mark.parametrize("src,dst", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                     (torch.float16, torch.float32)])
def test_row_blocks_are_bitwise_the_whole_tensor(rows, cols, rank, adapters, src, dst) -> None:
    base, deltas = _case(rows, cols, rank, adapters, src)
    expected = _whole(base, deltas, dst)
    for block in (1, 3 * cols, 10_000, 2**19):  # one-row blocks are refused by row_blocks: two rows at least
        out, ok = _rows(base, deltas, dst, block)
        assert ok
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8)), block
    nudged = [(a, b, s * (1 + 2**-10)) for a, b, s in deltas]  # negative control
    assert not torch.equal(_rows(base, nudged, dst, 10_000)[0].view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 100, 101])
@pytest.mark.parametrize("step", [1, 2, 5, 100])
def test_row_blocks_cover_without_single_rows(rows: int, step: int) -> None:
    blocks = mathops.row_blocks(rows, 10, step * 10)
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(r1 - r0 >= 2 for r0, r1 in blocks) or rows == 1


@pytest.mark.parametrize("bad,dst", [(float("nan"), torch.bfloat16), (float("inf"), torch.bfloat16),
                                     (70000.0, torch.float16)])
def test_a_non_finite_block_is_reported(bad: float, dst: torch.dtype) -> None:
    base, deltas = _case(300, 64, 8, 1, torch.float32)
    base[250, 3] = bad
    assert not _rows(base, deltas, dst, 1000)[1]
    assert _rows(base[:200], [(a, b[:200], s) for a, b, s in deltas], dst, 1000)[1]  # control: rows before it


@pytest.mark.parametrize("values,finite", [
    ([1.0, 2.0], True), ([1.0, float("nan")], False), ([float("inf"), 1.0], False),
    ([float("inf"), float("-inf")], False), ([3e38, 3e38], True), ([], True),  # the sum overflows, not the elements
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_finite(values: list[float], finite: bool, dtype: torch.dtype) -> None:
    t = torch.tensor(values, dtype=torch.float32).to(dtype)
    assert mathops.all_finite(t) is finite
    assert bool(torch.isfinite(t).all()) is finite  # control: the plain test agrees


# ---------------------------------------------------------------------------------- whole merges


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _write(job, folder: Path) -> dict[str, str]:
    folder.mkdir()
    merge_module.write_shards(job.plan, TensorReader(job.checkpoint.tensors), job.adapters, folder, torch.device("cpu"))
    return _digests(folder)


@pytest.mark.parametrize("adapters", [["llama_lora"], ["llama_lora", "llama_lora_b"], ["llama_dora"]])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_threads_and_blocks_write_what_the_whole_tensor_path_writes(zoo, tmp_path: Path, monkeypatch, adapters, dtype):
    """Small blocks on several threads, a writer slowed down so that output buffers are reused while
    it lags, against the whole-tensor path, shard by shard."""
    m = write_manifest(tmp_path / "job", zoo.base("llama"), [(zoo.adapter(a), 0.5) for a in adapters], dtype,
                       max_shard_size="40KB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job = prepare(m, for_output=False)
    assert any(merge_module.merges_by_rows(t) for t in job.plan.tensors) != (adapters == ["llama_dora"])
    monkeypatch.setattr(merge_module, "merges_by_rows", lambda t: False)
    expected = _write(job, tmp_path / "whole")
    monkeypatch.undo()

    monkeypatch.setattr(merge_module, "ROW_BLOCK", 100)
    real_write = merge_module.ShardWriter.write_tensor

    def slow_write(self, name, tensor):
        time.sleep(0.002)
        real_write(self, name, tensor)

    monkeypatch.setattr(merge_module.ShardWriter, "write_tensor", slow_write)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert _write(job, tmp_path / "rows") == expected
        assert torch.get_num_threads() == 3  # given back
    finally:
        torch.set_num_threads(before)


def test_an_error_stops_every_thread_and_gives_back_the_thread_count(zoo, tmp_path: Path, monkeypatch) -> None:
    m = write_manifest(tmp_path / "job", zoo.base("llama"), [(zoo.adapter("llama_lora"), None)], "bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job = prepare(m, for_output=False)
    real = merge_module.exact.merge_block
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MergeError("injected in a row thread")
        return real(*args)

    monkeypatch.setattr(merge_module.exact, "merge_block", failing)
    before = torch.get_num_threads()
    with pytest.raises(MergeError, match="injected in a row thread"):
        _write(job, tmp_path / "out")
    assert torch.get_num_threads() == before
    assert not [t for t in threading.enumerate() if t.name.startswith(("mergekit-rows", "mergekit-writer"))]


def test_an_overflow_names_the_tensor_as_before(zoo, tmp_path: Path) -> None:
    """A float16 output that overflows: the row-block path hands over to the whole-tensor one,
    whose error names the tensor and the cause."""
    m = write_manifest(tmp_path / "job", zoo.base("llama"), [(zoo.adapter("llama_lora"), 3e5)], "float16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job = prepare(m, for_output=False)
    with pytest.raises(MergeError, match=r"merged `.*proj.weight` overflows F16; nothing was published"):
        _write(job, tmp_path / "out")


def test_shard_digests_come_with_the_shards(zoo, tmp_path: Path) -> None:
    m = write_manifest(tmp_path / "job", zoo.base("llama"), [(zoo.adapter("llama_lora"), None)], "bfloat16",
                       max_shard_size="40KB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job = prepare(m, for_output=False)
    digests: dict[str, str] = {}
    (tmp_path / "out").mkdir()
    paths = merge_module.write_shards(job.plan, TensorReader(job.checkpoint.tensors), job.adapters, tmp_path / "out",
                                      torch.device("cpu"), digests=digests)
    assert len(paths) > 1
    assert digests == _digests(tmp_path / "out")
