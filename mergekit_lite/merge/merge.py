"""Streaming execution of a plan: read one tensor, apply its ops exactly, round once, write.

Linear LoRA deltas are merged one block of rows at a time, on several threads, in reused buffers;
the writes run on a worker thread a few tensors behind the math; untouched tensors are copied
byte for byte without a dtype round trip.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from mergekit_lite.errors import AdapterError, MergeError
from mergekit_lite.io.format import DTYPES
from mergekit_lite.io.reader import TensorReader
from mergekit_lite.io.writer import ShardWriter, Written
from mergekit_lite.merge import exact, fp8, mathops
from mergekit_lite.merge.combine import CombinedFactors
from mergekit_lite.plan.memory import EXPERT_FACTORS_KEPT, ROW_BLOCK, ROW_THREADS, WRITE_BEHIND, merges_by_rows
from mergekit_lite.plan.plan import SHARD_METADATA, CombinePlan, Op, Plan, PlannedTensor
from mergekit_lite.sources.adapter import Adapter
from mergekit_lite.vocabulary import EXPERT_LAYOUTS

Progress = Callable[[PlannedTensor], None]


@dataclass(frozen=True)
class ShardFile:
    """A shard as written: its file name, its size in bytes and its SHA-256 (hex; None when not asked for)."""

    name: str
    size: int
    sha256: str | None


def write_shards(plan: Plan, base: TensorReader, adapters: list[Adapter], folder: Path, device: torch.device,
                 progress: Progress | None = None, digests: dict[str, str] | None = None,
                 written: Written | None = None) -> list[Path]:
    """Write every planned shard into `folder`; return the shard paths in order.

    With `digests`, each shard's SHA-256 (hex) is put there under its file name, computed on the
    writer thread from the bytes as they go out, so that nothing has to read the shards again.
    With `written`, each write is reported there as it lands (the gate's checks in flight read it).

    On an error every file is closed and the error raised once the writer thread has stopped;
    the partial shards are left for the caller's staging folder to remove.
    """
    with ShardMerger(plan, base, adapters, folder, device, progress, digest=digests is not None,
                     written=written) as merger:
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
                 progress: Progress | None = None, digest: bool = False, written: Written | None = None) -> None:
        self.plan, self.base, self.folder, self.device = plan, base, folder, device
        self.progress, self.digest, self.written = progress, digest, written
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
        writer = ShardWriter(self.folder / self.plan.shard_names[index], self.plan.shard_entries(index), SHARD_METADATA,
                             digest=self.digest, written=self.written)
        self.writers.append(writer)
        scales: dict[str, torch.Tensor] = {}  # FP8 block scales, written right after their weight
        for t in tensors:
            if t.copied:
                src = self.base.locate(t.source)
                if t.part:  # a stored part of a quantized tensor (an FP8 weight or its scales)
                    assert src.quant is not None
                    src = src.quant.part(t.part)
                self.behind.submit(writer.copy_range, t.name, src.file, src.begin, src.nbytes)
            elif t.scale_of:
                self.behind.submit(writer.write_tensor, t.name, scales.pop(t.scale_of))
            else:
                dense = replace(t, dtype="F32", fp8_block=()) if t.fp8_block else t
                with mathops.intra_op_threads(self.own if merges_by_rows(dense) else self.threads):
                    out = merge_tensor(dense, self.base, self.factors, self.device, self.workspace)
                    if t.fp8_block:
                        out, scales[t.name] = fp8.quantize_blocks(out, (t.fp8_block[0], t.fp8_block[1]))
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
    """Apply the planned ops to one tensor and round the exact result once to the output dtype.

    Every element is the correctly rounded value of the exact merge (merge/exact.py), so the
    result is the same whatever the path, blocking, thread count or machine. With a workspace,
    linear LoRA deltas are merged on its threads into one of its output buffers; everything else
    here, one block of rows at a time (DoRA, whose norms need whole rows, in float64 as a whole).
    """
    out_dtype = DTYPES[t.dtype]
    if workspace is not None and merges_by_rows(t):
        merged = _merge_rows(t, base, factors, workspace)
        if merged is not None:
            return merged
        # not finite: the path below computes the same values and says what went wrong
    if not t.ops:
        return base.get(t.source).to(out_dtype)
    if len(t.shape) == 3 and all(op.layout in EXPERT_LAYOUTS for op in t.ops):
        return _merge_experts(t, base, factors, device)
    if any(op.kind == "dora" for op in t.ops):
        acc = _dora_float64(t, base, factors, device)
        out = exact.correct_round(acc, out_dtype)
        ok, inputs_finite = mathops.all_finite(out), mathops.all_finite(acc)
    else:
        w, terms, rows = _terms(t, base, factors, device)
        out = torch.empty(t.shape, dtype=out_dtype, device=device)
        matrix = _matrix(out)
        ok = exact.merge(_matrix(w), terms, matrix, mathops.row_blocks(*matrix.shape, ROW_BLOCK))
        for indices, values in rows:  # trainable tokens come last: their rows are the saved ones, rounded once
            out.index_copy_(0, indices, values.to(out_dtype))
        ok = ok and mathops.all_finite(out)
        inputs_finite = mathops.all_finite(w)
    if not ok:
        where = "overflows " + t.dtype if inputs_finite else "has NaN or Inf values"
        raise MergeError(f"merged `{t.name}` {where}; nothing was published")
    return out


def _merge_experts(t: PlannedTensor, base: TensorReader, factors: _Factors, device: torch.device) -> torch.Tensor:
    """A fused expert tensor [E, ., .], one expert's matrix at a time, each by blocks of rows: no
    more than one expert's block is worked on in float64 or float32 at once."""
    w = base.get(t.source).to(device)  # backed by a mapping of the file: each expert read as its turn comes
    out = torch.empty(t.shape, dtype=DTYPES[t.dtype], device=device)
    loaded = [(op, *factors.get_many(op.adapter, op.keys[:2])) for op in t.ops]
    blocks = mathops.row_blocks(t.shape[1], t.shape[2], ROW_BLOCK)
    ok = True
    for e in range(t.shape[0]):
        terms = [
            exact.term(*mathops.expert_factors(a, b, op.experts, e, op.layout == "experts_t"), op.scale)
            for op, a, b in loaded
        ]
        ok = exact.merge(w[e], terms, out[e], blocks) and ok
    if not (ok and mathops.all_finite(out)):
        where = "overflows " + t.dtype if mathops.all_finite(w) else "has NaN or Inf values"
        raise MergeError(f"merged `{t.name}` {where}; nothing was published")
    return out


def _matrix(x: torch.Tensor) -> torch.Tensor:
    """A bias as a one-column matrix; matrices as they are."""
    return x.view(-1, 1) if x.dim() == 1 else x


def _start(t: PlannedTensor, op: Op, base: TensorReader, factors: _Factors, device: torch.device,
           changed: bool) -> torch.Tensor:
    """The tensor a `replace` / `base_layer` op starts from (the adapter's saved copy, float32)."""
    new = factors.get(op.adapter, op.keys[0])
    if changed and not torch.equal(new, _base_fp32(t, base, device)):
        raise AdapterError(
            f"adapter {op.adapter}: `{op.keys[0]}` is a copy of `{t.name}` that differs from the base; "
            "the adapter was saved against another base model"
        )
    return new.clone()


def _terms(t: PlannedTensor, base: TensorReader, factors: _Factors, device: torch.device
           ) -> tuple[torch.Tensor, list[exact.Term], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The tensor a merge starts from, its LoRA deltas as exact.Terms in the stored frame, and the rows
    that trainable tokens replace afterwards (plan order: replacements, deltas, rows)."""
    w = None if t.ops[0].kind == "replace" else base.get(t.source).to(device)
    terms: list[exact.Term] = []
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    for op in t.ops:
        if op.kind in ("replace", "base_layer"):
            w = _start(t, op, base, factors, device, changed=bool(terms or rows))
        elif op.kind == "rows":
            rows.append((torch.tensor(op.indices, dtype=torch.long, device=device), factors.get(op.adapter, op.keys[0])))
        else:
            terms.append(_term(op, factors))
    assert w is not None
    return w, terms, rows


def _term(op: Op, factors: _Factors) -> exact.Term:
    """One delta op as W += scale * rows @ cols in the frame the weight is stored in."""
    if op.layout == "bias":
        bias = factors.get(op.adapter, op.keys[0])
        return exact.term(bias.view(-1, 1), torch.ones(1, 1, device=bias.device), op.scale)
    if op.layout in EXPERT_LAYOUTS:  # one expert's block, this tensor (ParamWrapper on experts stored one by one)
        lora_a, lora_b = factors.get_kept(op.adapter, op.keys[:2])
        rows, cols = mathops.expert_factors(lora_a, lora_b, op.experts, op.expert, op.layout == "experts_t", op.block)
        return exact.term(rows, cols, op.scale)
    lora_a, lora_b = factors.get_many(op.adapter, op.keys[:2])
    if op.layout in ("conv1d", "embedding"):  # stored [in, out] / [vocab, dim]: delta = (B A)^T = A^T B^T
        return exact.term(lora_a.T, lora_b.T, op.scale)
    return exact.term(lora_b, lora_a, op.scale)


def _dora_float64(t: PlannedTensor, base: TensorReader, factors: _Factors, device: torch.device) -> torch.Tensor:
    """A tensor with DoRA among its ops, evaluated in float64 in a fixed order (see exact.py)."""
    acc = None if t.ops[0].kind == "replace" else base.get(t.source).to(device=device, dtype=torch.float64)
    unmerged: torch.Tensor | None = None
    for op in t.ops:
        if op.kind in ("replace", "base_layer"):
            acc = _start(t, op, base, factors, device, changed=unmerged is not None).to(torch.float64)
            continue
        assert acc is not None
        if unmerged is None:
            unmerged = acc.clone()  # DoRA's norm is of the weight without earlier adapters merged in
        if op.kind == "rows":
            acc.index_copy_(0, torch.tensor(op.indices, dtype=torch.long, device=device),
                            factors.get(op.adapter, op.keys[0]).to(torch.float64))
            continue
        delta = _matrix(exact.fixed_order_delta(_term(op, factors))).view(acc.shape)
        if op.kind != "dora":
            acc = acc + delta
        elif op.layout == "conv1d":  # stored [in, out]: output features are columns
            acc = exact.dora_rescale(acc.T, unmerged.T, delta.T, factors.get(op.adapter, op.keys[2])).T
        else:
            acc = exact.dora_rescale(acc, unmerged, delta, factors.get(op.adapter, op.keys[2]))
    assert acc is not None
    return acc


def _merge_rows(t: PlannedTensor, base: TensorReader, factors: _Factors, workspace: Workspace) -> torch.Tensor | None:
    """The row-block merge of a linear weight into a workspace buffer; None if the result is not finite."""
    terms = [_term(op, factors) for op in t.ops]
    source = base.get(t.source)  # backed by a mapping of the file: pages are read as the blocks touch them
    out = workspace.output(t.shape, DTYPES[t.dtype])
    return out if workspace.merge_rows(source, terms, out) else None


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
        self.scratch = [exact.Scratch.empty() for _ in range(threads)]
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

    def merge_rows(self, base: torch.Tensor, terms: list[exact.Term], out: torch.Tensor) -> bool:
        """exact.merge over `base`, its blocks of rows shared among the threads; False if not finite."""
        blocks = mathops.row_blocks(*base.shape, ROW_BLOCK)
        parts = mathops.split(blocks, len(self.scratch))
        packed = exact.pack(terms)
        calls = [(base, packed, out, part, self.scratch[i]) for i, part in enumerate(parts)]
        pending = self.threads.map(_merge_part, calls)
        if any(p is False for p in pending):
            return False
        exact.resolve(base, terms, out, [p for part in pending for p in part])
        return True

    def close(self) -> None:
        """Stop the threads."""
        self.threads.close()


def _merge_part(base: torch.Tensor, packed: exact.Packed, out: torch.Tensor, blocks: list[tuple[int, int]],
                scratch: exact.Scratch) -> list[exact.Pending] | bool:
    """One thread's share of a row-block merge: its blocks merged, the elements left to decide."""
    pending = []
    for r0, r1 in blocks:
        part = exact.merge_block(base, packed, r0, r1, out, scratch)
        if part is False:
            return False
        if part is not None:
            pending.append(part)
    return pending


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
        self.kept: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self.lock = threading.Lock()

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

    def get_kept(self, index: int, keys: tuple[str, ...]) -> list[torch.Tensor]:
        """As get_many, keeping the last EXPERT_FACTORS_KEPT tensors: the factors of experts stored one
        by one, which every expert's tensors read (the plan's memory figure counts them)."""
        found = []
        for key in keys:
            with self.lock:
                tensor = self.kept.get((index, key))
                if tensor is not None:
                    self.kept.move_to_end((index, key))
            if tensor is None:
                (tensor,) = self.get_many(index, (key,))
                with self.lock:
                    self.kept[index, key] = tensor
                    while len(self.kept) > EXPERT_FACTORS_KEPT:
                        self.kept.popitem(last=False)
            found.append(tensor)
        return found

    def close(self) -> None:
        self.kept.clear()
        for reader in self.readers:
            reader.close()
        if self.combined is not None:
            self.combined.close()
