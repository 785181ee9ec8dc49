"""Streaming execution of a plan: read one tensor, apply its ops in fp32, round once, write.

Linear LoRA deltas are merged one block of rows at a time, on several threads, in reused buffers;
the writes run on a worker thread a few tensors behind the math; untouched tensors are copied
byte for byte without a dtype round trip.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from mergekit_lite.errors import AdapterError, MergeError
from mergekit_lite.io.format import DTYPES
from mergekit_lite.io.reader import TensorReader
from mergekit_lite.io.writer import ShardWriter
from mergekit_lite.merge import mathops
from mergekit_lite.merge.combine import CombinedFactors
from mergekit_lite.plan.memory import ROW_BLOCK, ROW_THREADS, WRITE_BEHIND, merges_by_rows
from mergekit_lite.plan.plan import CombinePlan, Op, Plan, PlannedTensor
from mergekit_lite.sources.adapter import Adapter

Progress = Callable[[PlannedTensor], None]


@dataclass(frozen=True)
class ShardFile:
    """A shard as written: its file name, its size in bytes and its SHA-256 (hex; None when not asked for)."""

    name: str
    size: int
    sha256: str | None


def write_shards(plan: Plan, base: TensorReader, adapters: list[Adapter], folder: Path, device: torch.device,
                 progress: Progress | None = None, digests: dict[str, str] | None = None) -> list[Path]:
    """Write every planned shard into `folder`; return the shard paths in order.

    With `digests`, each shard's SHA-256 (hex) is put there under its file name, computed on the
    writer thread from the bytes as they go out, so that nothing has to read the shards again.

    On an error every file is closed and the error raised once the writer thread has stopped;
    the partial shards are left for the caller's staging folder to remove.
    """
    with ShardMerger(plan, base, adapters, folder, device, progress, digest=digests is not None) as merger:
        for index in range(len(plan.shard_names)):
            merger.submit(index)
        written = merger.finish()
    if digests is not None:
        digests.update({f.name: f.sha256 for f in written if f.sha256 is not None})
    return [folder / f.name for f in written]


def write_shard(plan: Plan, index: int, base: TensorReader, adapters: list[Adapter], folder: Path,
                device: torch.device, progress: Progress | None = None) -> ShardFile:
    """Write shard `index` of the plan alone into `folder` (a worker's job); return its name, size and SHA-256."""
    with ShardMerger(plan, base, adapters, folder, device, progress, digest=True) as merger:
        merger.submit(index)
        (written,) = merger.finish()
    return written


class ShardMerger:
    """Merges and writes shards of a plan one after the other, with one writer thread and one
    row-merge workspace shared by all of them: a shard's last writes and its fsync overlap the
    next shard's math.

    Use as a context manager: `submit` queues a shard, `finish` waits for every write and says
    what was written. On leaving by an error every file is closed once the writer thread has
    stopped; the partial shards are left for the caller's staging folder to remove.
    """

    def __init__(self, plan: Plan, base: TensorReader, adapters: list[Adapter], folder: Path, device: torch.device,
                 progress: Progress | None = None, digest: bool = False) -> None:
        self.plan, self.base, self.folder, self.device = plan, base, folder, device
        self.progress, self.digest = progress, digest
        self.by_shard: dict[int, list[PlannedTensor]] = {}
        for t in plan.tensors:
            self.by_shard.setdefault(t.shard, []).append(t)
        self.factors = _Factors(adapters, device, plan.combine)
        self.writers: list[ShardWriter] = []
        # our threads each set theirs to 1, which becomes torch's default: restored on exit
        self.threads = torch.get_num_threads()
        self.workspace = Workspace(WriteBehind.DEPTH + 1, self.threads) if device.type == "cpu" else None
        # On the CPU this thread's own torch calls are small (factors, checks) except in whole-tensor
        # merges; with one intra-op thread they start no OpenMP team, whose sleeping threads take
        # longer to wake than the work takes (factor reads: 0.8 s against 0.3 s in a 6 GB merge).
        self.own = self.threads if self.workspace is None else 1
        self.behind = WriteBehind()

    def submit(self, index: int) -> None:
        """Merge shard `index` and queue its writes (and its close) on the writer thread."""
        tensors = self.by_shard.get(index, [])
        entries = [(t.name, t.dtype, t.shape) for t in tensors]
        writer = ShardWriter(self.folder / self.plan.shard_names[index], entries, {"format": "pt"}, digest=self.digest)
        self.writers.append(writer)
        for t in tensors:
            if not t.ops and t.dtype == t.src_dtype:
                src = self.base.locate(t.source)
                self.behind.submit(writer.copy_range, t.name, src.file, src.begin, src.nbytes)
            else:
                with mathops.intra_op_threads(self.own if merges_by_rows(t) else self.threads):
                    out = merge_tensor(t, self.base, self.factors, self.device, self.workspace)
                self.behind.submit(writer.write_tensor, t.name, out)
            if self.progress is not None:
                self.progress(t)
        self.behind.submit(writer.close)

    def finish(self) -> list[ShardFile]:
        """Wait for every queued write; the shards submitted so far, in order."""
        self.behind.drain()
        return [ShardFile(w.path.name, w.offset, w.sha256.hexdigest() if w.sha256 is not None else None)
                for w in self.writers]

    def __enter__(self) -> ShardMerger:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.behind.__exit__(kind, exc, tb)
        finally:
            for writer in self.writers:  # the writer thread has stopped here
                writer.abort()
            if self.workspace is not None:
                self.workspace.close()
            torch.set_num_threads(self.threads)
            self.base.close()
            self.factors.close()


def merge_tensor(t: PlannedTensor, base: TensorReader, factors: _Factors, device: torch.device,
                 workspace: Workspace | None = None) -> torch.Tensor:
    """Apply the planned ops to one tensor in fp32 and round once to the output dtype.

    With a workspace, linear LoRA deltas are merged by blocks of rows into one of its output
    buffers (bitwise the same result); everything else takes the whole-tensor path.
    """
    out_dtype = DTYPES[t.dtype]
    if workspace is not None and merges_by_rows(t):
        merged = _merge_rows(t, base, factors, workspace)
        if merged is not None:
            return merged
        # not finite: the whole-tensor path computes the same values and says what went wrong
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


def _merge_rows(t: PlannedTensor, base: TensorReader, factors: _Factors, workspace: Workspace) -> torch.Tensor | None:
    """The row-block merge of a linear weight into a workspace buffer; None if the result is not finite."""
    deltas = [(*factors.get_many(op.adapter, op.keys), op.scale) for op in t.ops]
    source = base.get(t.source)  # backed by a mapping of the file: pages are read as the blocks touch them
    out = workspace.output(t.shape, DTYPES[t.dtype])
    return out if workspace.merge_rows(source, deltas, out) else None


class Workspace:
    """Buffers and threads reused from tensor to tensor by the row-block merge.

    Output tensors are handed out in turn, so that one can be written while the next is computed:
    with `slots` = the writer's depth + 1, a buffer comes round again only after the write that
    used it has finished (WriteBehind waits for it before taking another job).

    The row blocks of a tensor are shared among `threads` threads (torch's intra-op thread count,
    at most ROW_THREADS; see mathops.BlockThreads), each with its own fp32 scratch blocks.
    """

    def __init__(self, slots: int, threads: int) -> None:
        self.outputs = [torch.empty(0, dtype=torch.uint8) for _ in range(slots)]
        self.turn = 0
        threads = max(1, min(threads, ROW_THREADS))
        self.scratch = [(torch.empty(0), torch.empty(0)) for _ in range(threads)]
        self.threads = mathops.BlockThreads(threads, "mergekit-rows")

    def output(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next output buffer, viewed as an uninitialised tensor of `shape` and `dtype`."""
        slot = self.turn % len(self.outputs)
        self.turn += 1
        nbytes = math.prod(shape) * dtype.itemsize
        if self.outputs[slot].numel() < nbytes:
            self.outputs[slot] = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.outputs[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return self.outputs[slot][:nbytes].view(dtype).view(shape)

    def merge_rows(self, base: torch.Tensor, deltas: list[tuple[torch.Tensor, torch.Tensor, float]],
                   out: torch.Tensor) -> bool:
        """mathops.merge_linear_rows over `base`, its blocks of rows shared among the threads."""
        rows, cols = base.shape
        blocks = mathops.row_blocks(rows, cols, ROW_BLOCK)
        numel = max(r1 - r0 for r0, r1 in blocks) * cols
        parts = mathops.split(blocks, len(self.scratch))
        for i in range(len(parts)):
            if self.scratch[i][0].numel() < numel:
                self.scratch[i] = (torch.empty(numel), torch.empty(numel))
        calls = [(base, deltas, out, *self.scratch[i], part) for i, part in enumerate(parts)]
        return all(self.threads.map(mathops.merge_linear_rows, calls))

    def close(self) -> None:
        """Stop the threads."""
        self.threads.close()


class WriteBehind:
    """Runs write jobs on one worker thread, in order, at most DEPTH jobs behind the caller.

    An exception in a job is raised in the caller at its next `submit` or at the end of the
    `with` block; on leaving the block by an exception, queued jobs are cancelled and the running
    one is waited for, so nothing writes after the block has ended.
    """

    DEPTH = WRITE_BEHIND

    def __init__(self) -> None:
        # one intra-op thread: its copies must not start OpenMP teams that compete with the merge's threads
        self._pool = ThreadPoolExecutor(1, "mergekit-writer", initializer=torch.set_num_threads, initargs=(1,))
        self._pending: deque[Future[Any]] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)` once fewer than DEPTH jobs are pending."""
        while len(self._pending) >= self.DEPTH:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every queued job; raise the first error among them."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.drain()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


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
    """Adapter tensors by key, read on demand (pread, see TensorReader.load) in fp32 and checked for NaN/Inf;
    with `combine`, also the combined adapter's factors (its index is combine.index), from combine.py."""

    def __init__(self, adapters: list[Adapter], device: torch.device, combine: CombinePlan | None = None) -> None:
        self.device = device
        self.readers = [TensorReader({k.key: k.entry for k in a.keys}) for a in adapters]
        self.labels = [a.label for a in adapters]
        self.combined = CombinedFactors(combine, adapters, device) if combine is not None else None

    def get(self, index: int, key: str) -> torch.Tensor:
        """Adapter `index`'s tensor `key` in fp32 on the compute device."""
        return self.get_many(index, (key,))[0]

    def get_many(self, index: int, keys: tuple[str, ...]) -> list[torch.Tensor]:
        """Adapter `index`'s tensors `keys`, in fp32 on the compute device."""
        if self.combined is not None and index == self.combined.plan.index:
            return self.combined.get_many(keys)
        tensors = []
        for key in keys:
            tensor = self.readers[index].load(key).to(device=self.device, dtype=torch.float32)
            if not mathops.all_finite(tensor):
                raise AdapterError(f"{self.labels[index]}: `{key}` contains NaN or Inf values")
            tensors.append(tensor)
        return tensors

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        if self.combined is not None:
            self.combined.close()
