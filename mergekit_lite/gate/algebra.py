"""Gate check 2, per-tensor algebra, streamed one tensor at a time.

For each changed tensor W' the expected product W'x is rebuilt from the base and the adapter
factors in factored form (W x + s B (A x), the DoRA rescale, replacements, token rows) on fixed
random probes x, in float64, without ever forming B @ A: a path independent of the merge's.
The difference is measured in ulps of the output dtype, so rounding once passes and a wrong
scale, transpose, key or dtype does not. Unchanged tensors must equal the base byte for byte.

With a combined adapter (`combine:` other than sum), B and A are the combined factors, computed
afresh by merge/combine.py (the merge's own are gone by now): this checks that the merge applied them
rightly; the combination itself is checked end to end against PEFT's add_weighted_adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_lite.gate.elementwise import ElementCheck, Worst
from mergekit_lite.gate.experts import KeptReader, canonical_factors, matrices
from mergekit_lite.gate.fp8 import Fp8Worst, check_fp8
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.rows import RowPasses, blocks, matmul, matmul_and_ulp_scale
from mergekit_lite.io.format import DTYPES, TensorEntry
from mergekit_lite.io.readback import HashedReads
from mergekit_lite.io.reader import AlignedBuffer, TensorReader, read_entry
from mergekit_lite.merge import mathops
from mergekit_lite.merge.combine import CombinedFactors
from mergekit_lite.plan.fp8 import grid
from mergekit_lite.plan.plan import Op, Plan, PlannedTensor
from mergekit_lite.sources.adapter import Adapter
from mergekit_lite.vocabulary import EXPERT_LAYOUTS, WHOLE_TENSOR

PROBES = 4
READ_AHEAD = 64 * 2**20  # bytes: a larger tensor (an embedding) is mapped when its turn comes, not read ahead


@dataclass
class TensorFigures:
    name: str
    residual_rms: float
    residual_max: float
    applied_sigmas: float


def check_algebra(
    report: GateReport,
    plan: Plan,
    adapters: list[Adapter],
    *,
    base: TensorReader,
    candidate: dict[str, TensorEntry],
    limits: dict[str, float],
    digests: dict[Path, str] | None = None,
    ready: Callable[[Path, int | None], None] | None = None,
    threads: int | None = None,
) -> None:
    """Record finiteness, unchanged-equals-base and the probe checks over every planned tensor.

    `base` reads the base checkpoint, `candidate` is the release's tensor table (from the structure
    checks), `limits` the thresholds for the release's dtype. Reads each tensor once, streamed; the
    candidate's shards are read once in all (io/readback.py), and with `digests` the SHA-256 of each
    shard file, computed from the bytes the checks read, is put there under its path. With `ready`
    (the checks in flight, gate/inflight.py), each read first waits for the merge to have written
    those bytes. `threads`: the threads the checks share (default: torch's).
    """
    out = HashedReads(candidate, ready)
    threads = threads or torch.get_num_threads()
    shared = {k for t in plan.tensors for op in t.ops if op.experts for k in op.keys}  # read by every expert
    factors = [KeptReader(a.reader(), shared) for a in adapters]
    combined = CombinedFactors(plan.combine, adapters) if plan.combine is not None else None
    non_finite: list[str] = []
    differs: list[str] = []
    fp8_worst = Fp8Worst()
    figures: list[TensorFigures] = []
    # missing ones, or of another shape or dtype, are already reported by the structure checks
    tensors = [
        t
        for t in plan.tensors
        if t.name in candidate and candidate[t.name].shape == t.shape and candidate[t.name].dtype == t.dtype
    ]

    def get(op: Op, i: int) -> torch.Tensor:
        """The op's i-th adapter tensor as stored (the combined adapter's, computed afresh)."""
        if combined is not None and op.adapter == combined.plan.index:
            return combined.get_many((op.keys[i],))[0]
        return factors[op.adapter].load(op.keys[i])

    # the row passes run on torch's threads; this thread's own calls are small, on one
    with (
        RowPasses(threads) as rows,
        ElementCheck(threads, limits["element_ulps"]) as elements,
        ReadAhead(out, base, tensors) as ahead,
        mathops.intra_op_threads(1),
    ):
        for t, (merged, w0) in zip(tensors, ahead, strict=True):
            if t.scale_of or t.part:  # FP8 block scales, or a stored part copied (a recomputed scale: below)
                if t.part and not _same_bytes(merged, w0):
                    differs.append(t.name)
                continue
            if t.fp8_block:
                scale = candidate.get(t.name + "_scale_inv")
                if scale is None or scale.shape != grid(t.shape, (t.fp8_block[0], t.fp8_block[1])):
                    fp8_worst.failing.append(t.name)  # the structure checks say what is wrong with it
                    continue
                check_fp8(t, merged, read_entry(scale), w0, get, fp8_worst)
                continue
            if not t.ops:
                if merged.is_floating_point() and not mathops.all_finite(merged):
                    non_finite.append(t.name)
                elif not _equals_base(t, merged, w0):
                    differs.append(t.name)
                continue
            for m, merged_m, w0_m in matrices(t, merged, w0):  # fused experts: each expert's matrix
                figure = _probe(m, merged_m, w0_m, factors, combined=combined, rows=rows)
                if figure is None:
                    non_finite.append(m.name)
                else:
                    figures.append(figure)
                    elements.check(m, merged_m, w0_m, get)
    found = out.finish()  # the bytes after the last tensor checked; after the loop, as it read in order
    if digests is not None:
        digests.update(found)
    report.add(
        "structure",
        "no NaN or Inf",
        not non_finite,
        figure=len(non_finite),
        threshold=0,
        detail=", ".join(non_finite[:3]),
    )
    if fp8_worst.tensors or fp8_worst.failing:
        _record_fp8(report, fp8_worst)
    # FP8 weights and scales computed from the merge are checked above, not against the base's bytes
    untouched = sum(1 for t in plan.tensors if t.part or not (t.ops or t.fp8_block or t.scale_of))
    report.add(
        "algebra",
        f"{untouched} unchanged tensors equal the base",
        not differs,
        figure=len(differs),
        threshold=0,
        detail=", ".join(differs[:3]),
    )
    if not figures:
        return
    _record_elements(report, elements.total, limits["element_ulps"])
    for metric, label in (
        ("residual_rms", "W'x residual, RMS ulps"),
        ("residual_max", "W'x residual, max ulps"),
        ("applied_sigmas", "expected change applied, |fraction - 1| in rounding sigmas"),
    ):
        worst = max(figures, key=lambda f: getattr(f, metric))
        value = getattr(worst, metric)
        limit = limits[metric]
        report.add(
            "algebra",
            f"{label} ({len(figures)} changed tensors)",
            value <= limit,
            figure=value,
            threshold=limit,
            detail=f"worst: {worst.name}",
            id=f"algebra.{metric}",
        )


def _record_fp8(report: GateReport, worst: Fp8Worst) -> None:
    """The FP8 tensors' rows: every element within its rounding bound (gate/fp8.py), every block's scale its own."""
    counted = f"{worst.elements} elements in {worst.tensors} FP8 tensors"
    detail = (
        f"worst: {worst.name}[{worst.index[0]}, {worst.index[1]}] = {worst.written:.9g}, expected {worst.expected:.9g}"
    )
    if worst.failing:
        detail += f"; {worst.beyond} past the bound, in {', '.join(worst.failing[:3])}"
    report.add(
        "algebra",
        "every FP8 element within half an e4m3 ulp (at its block scale) of W + delta (float64), share of the bound",
        not worst.failing,
        figure=worst.share,
        threshold=1.0,
        detail=f"{detail}; {counted}",
        id="algebra.fp8_elements",
    )
    report.add(
        "algebra",
        "FP8 block scales recomputed: each block's largest |code| is 448",
        not worst.bad_blocks,
        figure=len(worst.bad_blocks),
        threshold=0,
        detail=", ".join(worst.bad_blocks[:3]) or f"all {worst.blocks} blocks",
        id="algebra.fp8_scales",
    )


def _record_elements(report: GateReport, worst: Worst, element_ulps: float) -> None:
    """The elementwise check's row: the farthest element in ulps, failing on any past the bound."""
    counted = f"{worst.elements} elements in {worst.tensors} tensors"
    if not worst.name:
        detail = f"every one of {counted} is the correctly rounded value"
    else:
        where = f"{worst.name}[{', '.join(map(str, worst.index))}]"
        detail = f"worst: {where} = {worst.written:.9g}, expected {worst.expected:.9g}"
        if worst.beyond:
            detail += f"; {worst.beyond} past the bound, in {', '.join(worst.failing[:3])}"
        detail += f"; {worst.not_rounded} of {counted} not the correctly rounded value"
    report.add(
        "algebra",
        "every element of W' within the bound of W + delta (float64), ulps",
        worst.beyond == 0,
        figure=worst.ulps,
        threshold=element_ulps + 0.5,
        detail=detail,
    )


def _own_base(t: PlannedTensor) -> bool:
    """Whether t's base side is not its source's values: a stored part it copies, or none (recomputed FP8 scales)."""
    return bool(t.part or t.scale_of)


def _stored(base: TensorReader, t: PlannedTensor) -> torch.Tensor:
    """The bytes of the stored part t copies (an FP8 base's weight or scales); none for a recomputed scale."""
    if not t.part:
        return torch.empty(0, dtype=torch.uint8)
    entry = base.locate(t.source)
    assert entry.quant is not None
    return read_entry(entry.quant.part(t.part))


class ReadAhead:
    """Each tensor's candidate and base weights, in order, read on a thread of its own while the
    tensor before is checked, so that the disk and the CPU work at the same time: a release just
    written with direct I/O is not in the page cache, and its bytes come back from disk. The
    candidate is read with direct I/O, the base through the page cache (it may be there), into
    two pairs of reused buffers (TensorReader.load_into). Tensors larger than
    READ_AHEAD bytes (embeddings, mostly) are mapped instead when their turn comes, so that the
    buffers stay small and memory of the order of the largest tensor."""

    def __init__(self, candidate: HashedReads, base: TensorReader, tensors: list[PlannedTensor]) -> None:
        self.candidate, self.base, self.tensors = candidate, base, tensors
        self.pool = ThreadPoolExecutor(2, "mergekit-readahead")  # the candidate's reads and the base's side by side

    def _read(self, t: PlannedTensor, slot: tuple[AlignedBuffer, AlignedBuffer]) -> tuple[Future, Future]:
        return (
            self.pool.submit(self.candidate.load_into, t.name, slot[0], True),
            self.pool.submit(_stored, self.base, t)
            if _own_base(t)
            else self.pool.submit(self.base.load_into, t.source, slot[1]),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        slots = [(AlignedBuffer(), AlignedBuffer()) for _ in range(2)]  # one tensor checked, the next read
        ahead = None
        for i, t in enumerate(self.tensors):
            large = self._large(t)
            if large:  # mapped, and let go with the tensors: the buffers stay small
                pair = self.candidate.get(t.name), _stored(self.base, t) if _own_base(t) else self.base.get(t.source)
            else:
                reads = ahead if ahead is not None else self._read(t, slots[i % 2])
                wait(reads)  # both done with their buffers before an error is raised
                pair = reads[0].result(), reads[1].result()
            following = self.tensors[i + 1] if i + 1 < len(self.tensors) else None
            ahead = None
            if following and not large and not self._large(following):
                ahead = self._read(following, slots[(i + 1) % 2])
            yield pair  # the caller is done with it when it asks for the next, whose read reuses its buffers
            if large:  # hashed now that the check has its pages in memory, before the next read is hashed
                self.candidate.hash_mapped(t.name, pair[0])
            pair = None

    def _large(self, t: PlannedTensor) -> bool:
        return max(self.candidate.locate(t.name).nbytes, self.base.locate(t.source).nbytes) > READ_AHEAD

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _equals_base(t: PlannedTensor, merged: torch.Tensor, w0: torch.Tensor) -> bool:
    if t.dtype == t.src_dtype:  # byte for byte
        return _same_bytes(merged, w0)
    return torch.equal(merged, w0.to(DTYPES[t.dtype]))


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors hold the same bytes, compared as 8-byte words where both allow it:
    torch.equal on bytes takes 6 times as long (107 against 18 ms for 131 MB)."""
    x, y = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    if x.numel() != y.numel():
        return False
    if x.numel() % 8 == 0 and x.data_ptr() % 8 == 0 and y.data_ptr() % 8 == 0:
        x, y = x.view(torch.int64), y.view(torch.int64)
    return torch.equal(x, y)


def _probe(
    t: PlannedTensor,
    merged: torch.Tensor,
    w0: torch.Tensor,
    factors: list[KeptReader],
    *,
    combined: CombinedFactors | None = None,
    rows: RowPasses | None = None,
) -> TensorFigures | None:
    """Compare W'x with the factored expectation in float64; figures in output-dtype ulps.

    None when W' holds a NaN or an infinity. W'x is then not finite (no probe entry is zero), so
    W' itself is searched only when W'x is not finite: a pass over W' saved on every good tensor.
    """
    vector = merged.dim() == 1
    transposed = any(op.layout == "conv1d" and op.kind == "dora" for op in t.ops)
    w_out = merged.reshape(-1, 1) if vector else merged
    cols = w_out.shape[0] if transposed else w_out.shape[1]
    x = (
        torch.ones(1, 1, dtype=torch.float64)
        if vector
        else torch.randn(cols, PROBES, dtype=torch.float64, generator=torch.Generator().manual_seed(cols))
    )

    def get(op: Op, i: int) -> torch.Tensor:
        if combined is not None and op.adapter == combined.plan.index:
            return combined.get_many((op.keys[i],))[0].to(torch.float64)
        return factors[op.adapter].load(op.keys[i]).to(torch.float64)

    w0 = w0.reshape(-1, 1) if vector else w0
    y_base = matmul(w0, x, transposed, rows)
    y = y_base
    unmerged = w0
    started = False
    for op in t.ops:
        if op.kind in WHOLE_TENSOR:
            r = factors[op.adapter].load(op.keys[0])
            r = r.reshape(-1, 1) if vector else r
            if not started:
                unmerged = r
            y = matmul(r, x, transposed, rows)
            continue
        started = True
        y = _apply(op, y, x, unmerged, transposed=transposed, get=get)
    actual, scale = matmul_and_ulp_scale(w_out, x, transposed, rows=rows)
    if not mathops.all_finite(actual) and not mathops.all_finite(merged):
        return None
    ratio = (actual - y).abs() / scale
    # The share of the expected change W'x - Wx that is present, by regression onto it: 1 when
    # right, 0 when an adapter is missing, 2 when it is applied twice. Its deviation from 1 is
    # measured in standard errors of what rounding to the output dtype alone would cause
    # (uniform rounding error has a standard deviation of ulp / sqrt(12); 0.5 ulp is used).
    expected_change, actual_change = y - _resize(y_base, y), actual - _resize(y_base, y)
    norm = float((expected_change * expected_change).sum())
    if norm > 0:
        applied = float((actual_change * expected_change).sum()) / norm
        stderr = float((0.5 * scale * expected_change).pow(2).sum().sqrt()) / norm
        sigmas = abs(applied - 1.0) / max(stderr, 1e-300)
    else:
        sigmas = 0.0
    return TensorFigures(t.name, float(ratio.pow(2).mean().sqrt()), float(ratio.max()), sigmas)


def _apply(
    op: Op,
    y: torch.Tensor,
    x: torch.Tensor,
    unmerged: torch.Tensor,
    *,
    transposed: bool,
    get: Callable[[Op, int], torch.Tensor],
) -> torch.Tensor:
    """y + the change `op` makes to W x (W' x for op's tensor, given y = W x before it), in factored form."""
    if op.kind == "rows":
        y = y.clone()
        y[list(op.indices)] = get(op, 0) @ x
        return y
    if op.layout == "bias":
        return y + op.scale * get(op, 0).reshape(-1, 1) * x
    a, b = get(op, 0), get(op, 1)
    if op.layout in EXPERT_LAYOUTS:  # one expert's B_e, A_e (and their block), by PEFT's reshapes
        b, a = canonical_factors(op, a, b)
    if op.layout in ("linear", "experts") or transposed:  # canonical frame: W [out, in], delta = s B A
        change = op.scale * (b @ (a @ x))
    else:  # stored [in, out] (conv1d) or [vocab, dim] (embedding): delta = s (B A)^T
        change = op.scale * (a.T @ (b.T @ x))
    if op.kind != "dora":
        return y + change
    w0 = unmerged.T if transposed else unmerged
    norm = _dora_norm(w0, a, b, op.scale)
    factor = get(op, 2).reshape(-1, 1) / norm.reshape(-1, 1)
    return factor * (y + change)


def _dora_norm(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """Row norms of W0 + s B A without forming B A: |W0_i|^2 + 2 s (W0 A^T)_i . B_i + s^2 B_i (A A^T) B_i^T."""
    sq = torch.zeros(w0.shape[0], dtype=torch.float64)
    cross = torch.zeros(w0.shape[0], a.shape[0], dtype=torch.float64)
    for start, block in blocks(w0):
        sq[start : start + block.shape[0]] = (block * block).sum(dim=1)
        cross[start : start + block.shape[0]] = block @ a.T
    gram = a @ a.T
    total = sq + 2 * s * (cross * b).sum(dim=1) + s * s * ((b @ gram) * b).sum(dim=1)
    return total.clamp_min(0).sqrt()


def _resize(y_base: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The base product padded or cut to a resized vocabulary's rows (new rows count as change)."""
    if y_base.shape == like.shape:
        return y_base
    out = torch.zeros_like(like)
    n = min(y_base.shape[0], like.shape[0])
    out[:n] = y_base[:n]
    return out
