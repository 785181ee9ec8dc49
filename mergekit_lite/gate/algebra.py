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

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from mergekit_lite.gate.report import GateReport
from mergekit_lite.io.format import DTYPES, TensorEntry
from mergekit_lite.io.reader import AlignedBuffer, TensorReader
from mergekit_lite.merge import mathops
from mergekit_lite.merge.combine import CombinedFactors
from mergekit_lite.plan.plan import Op, Plan, PlannedTensor
from mergekit_lite.sources.adapter import Adapter
from mergekit_lite.vocabulary import WHOLE_TENSOR

PROBES = 4
READ_AHEAD = 64 * 2**20  # bytes: a larger tensor (an embedding) is mapped when its turn comes, not read ahead
BLOCK_ELEMENTS = 2**18  # rows are upcast in blocks of about this many elements: each block's passes stay in cache
_MANTISSA = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8, torch.float64: 53}
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
_ULP_SCALE = {dtype: 2.0 ** (2 - 2 * bits) for dtype, bits in _MANTISSA.items()}  # ulp^2 / (2^(e-1))^2
_EXPONENT_MASK = {
    torch.float32: 0x7F800000,
    torch.float16: 0x7C00,
    torch.bfloat16: 0x7F80,
    torch.float64: 0x7FF0000000000000,
}


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
) -> None:
    """Record finiteness, unchanged-equals-base and the probe checks over every planned tensor.

    `base` reads the base checkpoint, `candidate` is the release's tensor table (from the structure
    checks), `limits` the thresholds for the release's dtype. Reads each tensor once, streamed.
    """
    out = TensorReader(candidate)
    factors = [a.reader() for a in adapters]
    combined = CombinedFactors(plan.combine, adapters) if plan.combine is not None else None
    non_finite: list[str] = []
    differs: list[str] = []
    figures: list[TensorFigures] = []
    # missing ones, or of another shape or dtype, are already reported by the structure checks
    tensors = [
        t
        for t in plan.tensors
        if t.name in candidate and candidate[t.name].shape == t.shape and candidate[t.name].dtype == t.dtype
    ]
    # the row passes run on torch's threads; this thread's own calls are small, on one
    with (
        RowPasses(torch.get_num_threads()) as rows,
        ReadAhead(out, base, tensors) as ahead,
        mathops.intra_op_threads(1),
    ):
        for t, (merged, w0) in zip(tensors, ahead, strict=True):
            if not t.ops:
                if merged.is_floating_point() and not mathops.all_finite(merged):
                    non_finite.append(t.name)
                elif not _equals_base(t, merged, w0):
                    differs.append(t.name)
                continue
            figure = _probe(t, merged, w0, factors, combined=combined, rows=rows)
            if figure is None:
                non_finite.append(t.name)
            else:
                figures.append(figure)
    report.add(
        "structure",
        "no NaN or Inf",
        not non_finite,
        figure=len(non_finite),
        threshold=0,
        detail=", ".join(non_finite[:3]),
    )
    untouched = sum(1 for t in plan.tensors if not t.ops)
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
        )


class ReadAhead:
    """Each tensor's candidate and base weights, in order, read on a thread of its own while the
    tensor before is checked, so that the disk and the CPU work at the same time: a release just
    written with direct I/O is not in the page cache, and its bytes come back from disk (1.3-1.7
    GB/s here). The candidate is read with direct I/O, the base through the page cache (it may be
    there), into two pairs of reused buffers (TensorReader.load_into). Tensors larger than
    READ_AHEAD bytes (embeddings, mostly) are mapped instead when their turn comes, so that the
    buffers stay small and memory of the order of the largest tensor."""

    def __init__(self, candidate: TensorReader, base: TensorReader, tensors: list[PlannedTensor]) -> None:
        self.candidate, self.base, self.tensors = candidate, base, tensors
        self.pool = ThreadPoolExecutor(2, "mergekit-readahead")  # the candidate's reads and the base's side by side

    def _read(self, t: PlannedTensor, slot: tuple[AlignedBuffer, AlignedBuffer]) -> tuple[Future, Future]:
        return (
            self.pool.submit(self.candidate.load_into, t.name, slot[0], True),
            self.pool.submit(self.base.load_into, t.source, slot[1]),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        slots = [(AlignedBuffer(), AlignedBuffer()) for _ in range(2)]  # one tensor checked, the next read
        ahead = None
        for i, t in enumerate(self.tensors):
            if self._large(t):  # mapped, and let go with the tensors: the buffers stay small
                pair = self.candidate.get(t.name), self.base.get(t.source)
            else:
                reads = ahead if ahead is not None else self._read(t, slots[i % 2])
                wait(reads)  # both done with their buffers before an error is raised
                pair = reads[0].result(), reads[1].result()
            following = self.tensors[i + 1] if i + 1 < len(self.tensors) else None
            ahead = self._read(following, slots[(i + 1) % 2]) if following and not self._large(following) else None
            yield pair  # the caller is done with it when it asks for the next, whose read reuses its buffers

    def _large(self, t: PlannedTensor) -> bool:
        return max(self.candidate.locate(t.name).nbytes, self.base.locate(t.source).nbytes) > READ_AHEAD

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _equals_base(t: PlannedTensor, merged: torch.Tensor, w0: torch.Tensor) -> bool:
    if t.dtype == t.src_dtype:  # byte for byte
        return torch.equal(merged.reshape(-1).view(torch.uint8), w0.reshape(-1).view(torch.uint8))
    return torch.equal(merged, w0.to(DTYPES[t.dtype]))


def _probe(
    t: PlannedTensor,
    merged: torch.Tensor,
    w0: torch.Tensor,
    factors: list[TensorReader],
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
    y_base = _matmul(w0, x, transposed, rows)
    y = y_base
    unmerged = w0
    started = False
    for op in t.ops:
        if op.kind in WHOLE_TENSOR:
            r = factors[op.adapter].load(op.keys[0])
            r = r.reshape(-1, 1) if vector else r
            if not started:
                unmerged = r
            y = _matmul(r, x, transposed, rows)
            continue
        started = True
        y = _apply(op, y, x, unmerged, transposed=transposed, get=get)
    actual, scale = _matmul_and_ulp_scale(w_out, x, transposed, rows=rows)
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
    if op.layout == "linear" or transposed:  # canonical frame: W [out, in], delta = s B A
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
    for start, block in _blocks(w0):
        sq[start : start + block.shape[0]] = (block * block).sum(dim=1)
        cross[start : start + block.shape[0]] = block @ a.T
    gram = a @ a.T
    total = sq + 2 * s * (cross * b).sum(dim=1) + s * s * ((b @ gram) * b).sum(dim=1)
    return total.clamp_min(0).sqrt()


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit weights, float64 otherwise.

    A 16-bit W is exact in float32, and float32's rounding in W x (2^-24 relative, times the
    square root of the row length) is 2^-16 of the 16-bit ulps the check measures in: far below
    what it can see, at half float64's cost. float32 weights need float64.
    """
    return torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else torch.float64


def _matmul(w: torch.Tensor, x: torch.Tensor, transposed: bool, rows: RowPasses | None = None) -> torch.Tensor:
    """W x (or W^T x) in float64, computed a block of rows at a time in _work_dtype(W)."""
    product, _ = (rows or RowPasses(1)).run(w, x, transposed, _work_dtype(w), spread=False)
    return product.to(torch.float64)


def _matmul_and_ulp_scale(
    w: torch.Tensor, x: torch.Tensor, transposed: bool, work: torch.dtype | None = None, rows: RowPasses | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W x, sqrt(sum_j (ulp(W_ij) x_j)^2)) in float64, in one pass over W: the product, and the
    spread of it that one-ulp errors in W would cause. A float tensor's ulp is a power of two
    read off its exponent bits (see _exponent_squared)."""
    work = work or _work_dtype(w)
    product, spread = (rows or RowPasses(1)).run(w, x, transposed, work, spread=True)
    assert spread is not None
    if work != torch.float64 and not (
        bool((spread > 0).all()) and mathops.all_finite(spread) and mathops.all_finite(product)
    ):
        # bfloat16 rows of values below 2^-63 (or above 2^63) have ulps whose squares under- (over-)
        # flow float32: redo in float64
        return _matmul_and_ulp_scale(w, x, transposed, torch.float64, rows)
    return product.to(torch.float64), spread.to(torch.float64).sqrt()


class RowPasses:
    """One pass over a weight's rows, a block at a time: W x and, if asked, sum_j ulp(W_ij)^2 x_j^2.

    The blocks are shared among `threads` threads (mathops.BlockThreads), each with its own
    scratch blocks, reused from tensor to tensor: the check's cost is passes over
    cache-sized blocks (upcast, exponent mask, square, two thin products), which one team of
    intra-op threads mostly spends waking up for, and fresh temporaries per block doubled (a
    block of 2^18 elements: 1.7 against 3.5 ns an element on one thread, measured). Whole blocks
    go to each thread, so a row's figures do not depend on the thread count (W^T x, summed over
    rows, does, by float32 rounding).
    """

    def __init__(self, threads: int) -> None:
        self.threads = mathops.BlockThreads(threads, "mergekit-algebra")
        self.scratch: list[dict[torch.dtype, torch.Tensor]] = [{} for _ in range(self.threads.threads)]

    def close(self) -> None:
        self.threads.close()

    def __enter__(self) -> RowPasses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self, w: torch.Tensor, x: torch.Tensor, transposed: bool, work: torch.dtype, spread: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W x or W^T x, and the ulp spread's square when `spread`) in `work`."""
        xw = x.to(work)
        x2 = (xw * xw).mul_(_ULP_SCALE[w.dtype])
        parts = mathops.split(mathops.row_blocks(w.shape[0], w.shape[1], BLOCK_ELEMENTS), len(self.scratch))
        n = len(parts)
        out_rows = w.shape[1] if transposed else w.shape[0]
        outputs = [
            (
                torch.zeros(out_rows, x.shape[1], dtype=work),
                torch.zeros(out_rows, x.shape[1], dtype=work) if spread else None,
            )
            for _ in range(n if transposed else 1)
        ]
        self.threads.map(
            _row_pass,
            [
                (w, xw, x2, transposed, w.dtype, part, self.scratch[i], *outputs[i if transposed else 0])
                for i, part in enumerate(parts)
            ],
        )
        product, square = outputs[0]
        for p, q in outputs[1:]:  # transposed: the threads' partial sums
            product += p
            if square is not None:
                square += q
        return product, square


def _row_pass(
    w: torch.Tensor,
    xw: torch.Tensor,
    x2: torch.Tensor,
    transposed: bool,
    dtype: torch.dtype,
    blocks: list[tuple[int, int]],
    scratch: dict[torch.dtype, torch.Tensor],
    product: torch.Tensor,
    square: torch.Tensor | None,
) -> None:
    """_matmul's and _matmul_and_ulp_scale's work on some row blocks of W, in scratch buffers.

    Positional, as BlockThreads.map calls it with one tuple of arguments per part."""
    work = xw.dtype
    for start, stop in blocks:
        block = _buffer(scratch, (stop - start, w.shape[1]), work)
        block.copy_(w[start:stop])
        if transposed:
            product.addmm_(block.T, xw[start:stop])
        else:
            torch.mm(block, xw, out=product[start:stop])
        if square is None:
            continue
        ulp2 = _exponent_squared(block, dtype, out=block)  # in place: the block is done with; x2 carries _ULP_SCALE
        if transposed:
            square.addmm_(ulp2.T, x2[start:stop])
        else:
            torch.mm(ulp2, x2, out=square[start:stop])


def _buffer(scratch: dict[torch.dtype, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reusable uninitialised buffer of `shape` from a thread's scratch, grown when too small."""
    numel = math.prod(shape)
    held = scratch.get(dtype)
    if held is None or held.numel() < numel:
        scratch[dtype] = held = torch.empty(numel, dtype=dtype)
    return held[:numel].view(shape)


def _exponent_squared(block: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """(2^(e-1))^2 for the `dtype` values W held exactly in `block` (float32 or float64), into `out`
    when given: ulp(W_ij)^2 / _ULP_SCALE[dtype], where ulp(v) = 2^(e - mantissa bits of dtype) for
    |v| = m 2^e, m in [0.5, 1), and the smallest normal's ulp for zeros and subnormals. The row
    passes fold _ULP_SCALE, a power of two, into x^2: the same products, one pass fewer.

    Clearing the sign and mantissa bits leaves 2^(e-1) exactly, for the cost of an integer AND;
    frexp and pow over a float64 copy cost five times as much (the algebra check's largest cost).
    Zeros and subnormals count as the smallest normal; where that one's square underflows the
    block's dtype anyway (bfloat16 in float32), the clamp changes nothing and is skipped.
    """
    out = torch.empty_like(block) if out is None else out
    integer = _INT[block.dtype]
    mask = torch.tensor(_EXPONENT_MASK[block.dtype], dtype=integer)  # as a tensor: a faster kernel than a scalar's
    torch.bitwise_and(block.view(integer), mask, out=out.view(integer))  # 2^(e-1)
    tiny, work = torch.finfo(dtype).tiny, torch.finfo(block.dtype)
    if tiny * tiny >= work.smallest_normal * work.eps:  # its square is representable (else it is 0 like a zero's)
        out.clamp_min_(tiny)
    return out.mul_(out)


def _blocks(w: torch.Tensor):
    rows = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        yield start, w[start : start + rows].to(torch.float64)


def _resize(y_base: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The base product padded or cut to a resized vocabulary's rows (new rows count as change)."""
    if y_base.shape == like.shape:
        return y_base
    out = torch.zeros_like(like)
    n = min(y_base.shape[0], like.shape[0])
    out[:n] = y_base[:n]
    return out
