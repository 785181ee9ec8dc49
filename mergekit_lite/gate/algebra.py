"""Gate check 2, per-tensor algebra, streamed one tensor at a time.

For each changed tensor W' the expected product W'x is rebuilt from the base and the adapter
factors in factored form (W x + s B (A x), the DoRA rescale, replacements, token rows) on fixed
random probes x, in float64, without ever forming B @ A: a path independent of the merge's.
The difference is measured in ulps of the output dtype, so rounding once passes and a wrong
scale, transpose, key or dtype does not. Unchanged tensors must equal the base byte for byte.

With a combined adapter (`combine:` other than sum), B and A are the combined factors, computed
afresh by combine.py (the merge's own are gone by now): this checks that the merge applied them
rightly; the combination itself is checked end to end against PEFT's add_weighted_adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from mergekit_lite import mathops
from mergekit_lite.adapter import Adapter
from mergekit_lite.combine import CombinedFactors
from mergekit_lite.gate.report import GateReport
from mergekit_lite.plan import Op, Plan, PlannedTensor
from mergekit_lite.reader import TensorReader
from mergekit_lite.stformat import DTYPES, TensorEntry

PROBES = 4
BLOCK_ELEMENTS = 2**18  # rows are upcast in blocks of about this many elements: each block's passes stay in cache
_MANTISSA = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8, torch.float64: 53}
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
_EXPONENT_MASK = {torch.float32: 0x7F800000, torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float64: 0x7FF0000000000000}


@dataclass
class TensorFigures:
    name: str
    residual_rms: float
    residual_max: float
    applied_sigmas: float


def check_algebra(report: GateReport, plan: Plan, adapters: list[Adapter], base: TensorReader,
                  candidate: dict[str, TensorEntry], limits: dict[str, float]) -> None:
    """Record finiteness, unchanged-equals-base and the probe checks over every planned tensor."""
    out = TensorReader(candidate)
    factors = [TensorReader({k.key: k.entry for k in a.keys}) for a in adapters]
    combined = CombinedFactors(plan.combine, adapters) if plan.combine is not None else None
    non_finite: list[str] = []
    differs: list[str] = []
    figures: list[TensorFigures] = []
    for t in plan.tensors:
        if t.name not in candidate or candidate[t.name].shape != t.shape or candidate[t.name].dtype != t.dtype:
            continue  # already reported by the structure checks
        merged = out.get(t.name)
        if merged.is_floating_point() and not mathops.all_finite(merged):
            non_finite.append(t.name)
            continue
        if not t.ops:
            if not _equals_base(t, merged, base, candidate[t.name]):
                differs.append(t.name)
            continue
        figures.append(_probe(t, merged, base, factors, combined))
    report.add("structure", "no NaN or Inf", not non_finite, len(non_finite), 0, ", ".join(non_finite[:3]))
    untouched = sum(1 for t in plan.tensors if not t.ops)
    report.add("algebra", f"{untouched} unchanged tensors equal the base", not differs, len(differs), 0,
               ", ".join(differs[:3]))
    if not figures:
        return
    for metric, label in (("residual_rms", "W'x residual, RMS ulps"), ("residual_max", "W'x residual, max ulps"),
                          ("applied_sigmas", "expected change applied, |fraction - 1| in rounding sigmas")):
        worst = max(figures, key=lambda f: getattr(f, metric))
        value = getattr(worst, metric)
        limit = limits[metric]
        report.add("algebra", f"{label} ({len(figures)} changed tensors)", value <= limit, value, limit,
                   f"worst: {worst.name}")


def _equals_base(t: PlannedTensor, merged: torch.Tensor, base: TensorReader, entry: TensorEntry) -> bool:
    if t.dtype == t.src_dtype:
        return all(a == b for a, b in zip(base.raw_chunks(t.source, 2**26), _raw(entry), strict=True))
    return torch.equal(merged, base.get(t.source).to(DTYPES[t.dtype]))


def _raw(entry: TensorEntry):
    return TensorReader({entry.name: entry}).raw_chunks(entry.name, 2**26)


def _probe(t: PlannedTensor, merged: torch.Tensor, base: TensorReader, factors: list[TensorReader],
           combined: CombinedFactors | None = None) -> TensorFigures:
    """Compare W'x with the factored expectation in float64; figures in output-dtype ulps."""
    vector = merged.dim() == 1
    transposed = any(op.layout == "conv1d" and op.kind == "dora" for op in t.ops)
    w_out = merged.reshape(-1, 1) if vector else merged
    cols = w_out.shape[0] if transposed else w_out.shape[1]
    x = torch.ones(1, 1, dtype=torch.float64) if vector else torch.randn(
        cols, PROBES, dtype=torch.float64, generator=torch.Generator().manual_seed(cols))
    def get(op: Op, i: int) -> torch.Tensor:
        if combined is not None and op.adapter == combined.plan.index:
            return combined.get_many((op.keys[i],))[0].to(torch.float64)
        return factors[op.adapter].get(op.keys[i]).to(torch.float64)

    w0 = base.get(t.source)
    w0 = w0.reshape(-1, 1) if vector else w0
    y_base = _matmul(w0, x, transposed)
    y = y_base
    unmerged = w0
    started = False
    for op in t.ops:
        if op.kind in ("replace", "base_layer"):
            r = factors[op.adapter].get(op.keys[0])
            r = r.reshape(-1, 1) if vector else r
            if not started:
                unmerged = r
            y = _matmul(r, x, transposed)
            continue
        started = True
        y = _apply(op, y, x, unmerged, transposed, get)
    actual, scale = _matmul_and_ulp_scale(w_out, x, transposed)
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


def _apply(op: Op, y: torch.Tensor, x: torch.Tensor, unmerged: torch.Tensor, transposed: bool, get) -> torch.Tensor:
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
    w0 = (unmerged.T if transposed else unmerged)
    norm = _dora_norm(w0, a, b, op.scale)
    factor = get(op, 2).reshape(-1, 1) / norm.reshape(-1, 1)
    return factor * (y + change)


def _dora_norm(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """Row norms of W0 + s B A without forming B A: |W0_i|^2 + 2 s (W0 A^T)_i . B_i + s^2 B_i (A A^T) B_i^T."""
    sq = torch.zeros(w0.shape[0], dtype=torch.float64)
    cross = torch.zeros(w0.shape[0], a.shape[0], dtype=torch.float64)
    for start, block in _blocks(w0):
        sq[start:start + block.shape[0]] = (block * block).sum(dim=1)
        cross[start:start + block.shape[0]] = block @ a.T
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


def _matmul(w: torch.Tensor, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """W x (or W^T x) in float64, computed a block of rows at a time in _work_dtype(W)."""
    work = _work_dtype(w)
    xw = x.to(work)
    if transposed:
        out = torch.zeros(w.shape[1], x.shape[1], dtype=work)
        for start, block in _blocks(w, work):
            out += block.T @ xw[start:start + block.shape[0]]
        return out.to(torch.float64)
    return torch.cat([block @ xw for _, block in _blocks(w, work)]).to(torch.float64)


def _matmul_and_ulp_scale(w: torch.Tensor, x: torch.Tensor, transposed: bool,
                          work: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W x, sqrt(sum_j (ulp(W_ij) x_j)^2)) in float64, in one pass over W: the product, and the
    spread of it that one-ulp errors in W would cause. A float tensor's ulp is a power of two
    read off its exponent bits (see _ulp_squared)."""
    work = work or _work_dtype(w)
    xw = x.to(work)
    x2 = xw * xw
    rows = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))
    if transposed:
        product = torch.zeros(w.shape[1], x.shape[1], dtype=work)
        spread = torch.zeros(w.shape[1], x.shape[1], dtype=work)
    else:
        products, spreads = [], []
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows].to(work)
        ulp2 = _ulp_squared(block, w.dtype)
        if transposed:
            product += block.T @ xw[start:start + block.shape[0]]
            spread += ulp2.T @ x2[start:start + block.shape[0]]
        else:
            products.append(block @ xw)
            spreads.append(ulp2 @ x2)
    if not transposed:
        product, spread = torch.cat(products), torch.cat(spreads)
    if work != torch.float64 and not (bool((spread > 0).all()) and mathops.all_finite(spread)
                                      and mathops.all_finite(product)):
        # bfloat16 rows of values below 2^-63 (or above 2^63) have ulps whose squares under- (over-)
        # flow float32: redo in float64
        return _matmul_and_ulp_scale(w, x, transposed, torch.float64)
    return product.to(torch.float64), spread.to(torch.float64).sqrt()


def _ulp_squared(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ulp(W_ij)^2 for the `dtype` values W held exactly in `block` (float32 or float64), where
    ulp(v) = 2^(e - mantissa bits of dtype) for |v| = m 2^e, m in [0.5, 1), and the smallest
    normal's ulp for zeros and subnormals.

    Clearing the sign and mantissa bits leaves 2^(e-1) exactly, for the cost of an integer AND;
    frexp and pow over a float64 copy cost five times as much (the algebra check's largest cost).
    """
    bits = _MANTISSA[dtype]
    exponent_only = (block.view(_INT[block.dtype]) & _EXPONENT_MASK[block.dtype]).view(block.dtype)
    floor = exponent_only.clamp_min(torch.finfo(dtype).tiny)  # 2^(e-1), at least the smallest normal's
    return (floor * floor).mul_(2.0 ** (2 - 2 * bits))


def _blocks(w: torch.Tensor, work: torch.dtype = torch.float64):
    rows = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        yield start, w[start:start + rows].to(work)


def _resize(y_base: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The base product padded or cut to a resized vocabulary's rows (new rows count as change)."""
    if y_base.shape == like.shape:
        return y_base
    out = torch.zeros_like(like)
    n = min(y_base.shape[0], like.shape[0])
    out[:n] = y_base[:n]
    return out
