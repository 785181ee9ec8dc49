"""Streaming execution of a plan: read one tensor, apply its ops in fp32, round once, write."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mergekit_lite import mathops
from mergekit_lite.adapter import Adapter
from mergekit_lite.errors import AdapterError, MergeError
from mergekit_lite.plan import COPY_CHUNK, Op, Plan, PlannedTensor
from mergekit_lite.reader import TensorReader
from mergekit_lite.stformat import DTYPES
from mergekit_lite.writer import ShardWriter

Progress = Callable[[PlannedTensor], None]


def write_shards(plan: Plan, base: TensorReader, adapters: list[Adapter], folder: Path, device: torch.device,
                 progress: Progress | None = None) -> list[Path]:
    """Write every planned shard into `folder`; return the shard paths in order."""
    factors = _Factors(adapters, device)
    by_shard: dict[int, list[PlannedTensor]] = {}
    for t in plan.tensors:
        by_shard.setdefault(t.shard, []).append(t)
    paths = []
    try:
        for index, name in enumerate(plan.shard_names):
            tensors = by_shard[index]
            path = folder / name
            entries = [(t.name, t.dtype, t.shape) for t in tensors]
            with ShardWriter(path, entries, {"format": "pt"}) as writer:
                for t in tensors:
                    if not t.ops and t.dtype == t.src_dtype:
                        writer.write_raw(t.name, base.raw_chunks(t.source, COPY_CHUNK))
                    else:
                        writer.write_tensor(t.name, merge_tensor(t, base, factors, device))
                    if progress is not None:
                        progress(t)
            paths.append(path)
    finally:
        base.close()
        factors.close()
    return paths


def merge_tensor(t: PlannedTensor, base: TensorReader, factors: _Factors, device: torch.device) -> torch.Tensor:
    """Apply the planned ops to one tensor in fp32 and round once to the output dtype."""
    out_dtype = DTYPES[t.dtype]
    if not t.ops:
        return base.get(t.source).to(out_dtype)
    starts_replaced = t.ops[0].kind == "replace"
    acc = None if starts_replaced else base.get(t.source).to(device=device, dtype=torch.float32)
    unmerged: torch.Tensor | None = None
    changed = False
    for op in t.ops:
        if op.kind in ("replace", "base_layer"):
            new = factors.get(op.adapter, op.keys[0])
            if changed and not torch.equal(new, _base_fp32(t, base, device)):
                raise AdapterError(
                    f"adapter {op.adapter}: `{op.keys[0]}` is a copy of `{t.name}` that differs from the base; "
                    "the adapter was saved against another base model"
                )
            acc = new.clone()
            continue
        assert acc is not None
        if not changed and any(o.kind == "dora" for o in t.ops):
            unmerged = acc.clone()
        changed = True
        acc = _apply(op, acc, unmerged, factors)
    assert acc is not None
    out = mathops.round_to(acc, out_dtype)
    if not mathops.all_finite(out):
        where = "overflows " + t.dtype if mathops.all_finite(acc) else "has NaN or Inf values"
        raise MergeError(f"merged `{t.name}` {where}; nothing was published")
    return out


def _apply(op: Op, acc: torch.Tensor, unmerged: torch.Tensor | None, factors: _Factors) -> torch.Tensor:
    if op.kind == "rows":
        mathops.replace_rows(acc, op.indices, factors.get(op.adapter, op.keys[0]))
        return acc
    if op.layout == "bias":
        mathops.add_delta(acc, factors.get(op.adapter, op.keys[0]) * op.scale)
        return acc
    delta = mathops.lora_delta(factors.get(op.adapter, op.keys[0]), factors.get(op.adapter, op.keys[1]), op.scale, op.layout)
    if op.kind == "dora":
        assert unmerged is not None
        return mathops.dora_merge(acc, unmerged, delta, factors.get(op.adapter, op.keys[2]), op.layout)
    mathops.add_delta(acc, delta)
    return acc


def _base_fp32(t: PlannedTensor, base: TensorReader, device: torch.device) -> torch.Tensor:
    return base.get(t.source).to(device=device, dtype=torch.float32)


class _Factors:
    """Adapter tensors by key, read on demand in fp32 and checked for NaN/Inf."""

    def __init__(self, adapters: list[Adapter], device: torch.device) -> None:
        self.device = device
        self.readers = [TensorReader({k.key: k.entry for k in a.keys}) for a in adapters]
        self.labels = [a.label for a in adapters]

    def get(self, index: int, key: str) -> torch.Tensor:
        """Adapter `index`'s tensor `key` in fp32 on the compute device."""
        tensor = self.readers[index].get(key).to(device=self.device, dtype=torch.float32)
        if not mathops.all_finite(tensor):
            raise AdapterError(f"{self.labels[index]}: `{key}` contains NaN or Inf values")
        return tensor

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
