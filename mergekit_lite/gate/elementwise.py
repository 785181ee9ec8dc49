"""Gate check 2b, every element: each changed tensor against W + delta computed here in float64.

The probes of algebra.py see a tensor through a few products W'x, so one destroyed weight among
millions can hide in them (a residual of 7.7 ulps under a threshold of 16). This check compares
every element of a changed tensor with its expected value v, computed in float64 from the base
and the adapter factors as stored, a block of rows at a time (one block of v per thread at most),
by code of its own: not merge/exact.py's, whose bytes it checks.

The bound. The merge writes, for every element of a non-DoRA tensor, the exact W + sum s B A
rounded once (merge/exact.py), and for DoRA the correctly rounded fixed-order float64 value: at
most half an ulp from v, up to v's own float64 error e. The check allows `element_ulps` more
(tolerances.py; 1 for every dtype): an element passes when

    |W'_ij - v_ij| <= (element_ulps + 1/2) * ulp + e,

ulp being the output dtype's ulp at the largest of |W'_ij|, |v_ij| and |delta_ij| (the smallest
normal's below it). So the correctly rounded value and its two neighbours pass, and any other value
fails where the delta is not larger than the result: a flipped exponent bit or any mantissa bit but
the lowest, a wrong or missing delta. The extra ulp is there because one ulp is the difference
rounding alone makes between correct merges (a release built before correct rounding, or by a tool
rounding once in float32, is an ulp off here and there), which the probes and the end-to-end check
accept as noise too: this check is for damage, not for a rounding convention. |delta| enters for
the same reason: the conventional merge in the output dtype (PEFT's merge_and_unload in bfloat16:
B A rounded, times the scale rounded, added to W rounded) makes three roundings of half an ulp, two
of them at delta's size, which exceed the result's ulps where a strongly trained delta cancels much
of W; the bound, 1.5 ulps at the largest of the three, covers exactly those. The report says how
many elements are not the correctly rounded value, and the worst element's distance in ulps.

e bounds the float64 evaluation's own error: for sums of products, 2 n u (max |W| + max_i sum_k
|s B_ik| max_l |A_kl|) over the tensor (n terms per dot product, u = 2^-53); for DoRA a relative
2 (columns + rank + 8) u of the rescaled value on top (the row norm's sum of squares).

Cost: most elements are exactly v rounded to the output dtype, which one comparison of the block
with v's rounding shows; only the elements that differ are measured, one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mergekit_lite.gate.experts import canonical_factors
from mergekit_lite.merge import mathops
from mergekit_lite.plan.plan import Op, PlannedTensor
from mergekit_lite.vocabulary import EXPERT_LAYOUTS, WHOLE_TENSOR

BLOCK_ELEMENTS = 2**17  # float64 elements of a block: v and its rounding stay near the L2 cache
U64 = 2.0**-53
MANTISSA = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
EMIN = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}
_EXPONENT64 = 0x7FF0000000000000

Getter = Callable[[Op, int], torch.Tensor]  # (op, i): the op's i-th adapter tensor, as stored


@dataclass
class Worst:
    """The element farthest from its expected value (in ulps) and the counts over the tensors seen."""

    ulps: float = 0.0
    name: str = ""
    index: tuple[int, ...] = ()
    written: float = 0.0
    expected: float = 0.0
    beyond: int = 0  # elements past the bound
    not_rounded: int = 0  # elements past half an ulp (+ e): not the correctly rounded value
    elements: int = 0
    tensors: int = 0
    failing: list[str] = field(default_factory=list)  # tensors with elements past the bound, in order

    def add(self, other: Worst) -> None:
        if other.ulps > self.ulps:
            self.ulps, self.name, self.index = other.ulps, other.name, other.index
            self.written, self.expected = other.written, other.expected
        self.beyond += other.beyond
        self.not_rounded += other.not_rounded
        self.elements += other.elements
        self.tensors += other.tensors
        self.failing += [n for n in other.failing if n not in self.failing]


class ElementCheck:
    """Runs the elementwise check tensor by tensor, its blocks shared among `threads` threads."""

    def __init__(self, threads: int, element_ulps: float) -> None:
        self.threads = mathops.BlockThreads(threads, "mergekit-elements")
        self.scratch: list[dict[torch.dtype, torch.Tensor]] = [{} for _ in range(self.threads.threads)]
        self.allowed = element_ulps + 0.5
        self.total = Worst()

    def close(self) -> None:
        self.threads.close()

    def __enter__(self) -> ElementCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, t: PlannedTensor, merged: torch.Tensor, w0: torch.Tensor, get: Getter) -> None:
        """Compare every element of the changed tensor `merged` with its expectation from `w0` and the ops."""
        expect = Expectation(t, w0, get)
        out = merged.reshape(-1, 1) if merged.dim() == 1 else merged
        blocks = mathops.row_blocks(out.shape[0], out.shape[1], BLOCK_ELEMENTS)
        parts = mathops.split(blocks, len(self.scratch))
        calls = [(t.name, out, expect, part, self.allowed, self.scratch[i]) for i, part in enumerate(parts)]
        for worst in self.threads.map(_check_blocks, calls):
            self.total.add(worst)
        self.total.tensors += 1


def _check_blocks(
    name: str,
    out: torch.Tensor,
    expect: Expectation,
    blocks: list[tuple[int, int]],
    allowed: float,
    scratch: dict[torch.dtype, torch.Tensor],
) -> Worst:
    """One thread's share: its blocks' worst element and counts."""
    worst = Worst()
    for r0, r1 in blocks:
        v, scale = expect.rows(r0, r1, _buffer(scratch, (r1 - r0, out.shape[1]), torch.float64))
        w = out[r0:r1]
        worst.elements += w.numel()
        rounded = _buffer(scratch, w.shape, w.dtype)
        rounded.copy_(v)
        # the elements whose bits are not v's rounding (torch's; an ulp off now and then, by double
        # rounding through float32): numpy on integer views, one pass over 16-bit data
        differs = _differing(rounded, w)
        if not differs.size:  # every element is v rounded: within half an ulp (+ e)
            continue
        start = expect.start[r0:r1]
        _measure(name, w, v, start, differs, expect.error(v, scale), r0, allowed, worst, vector=expect.vector)
    return worst


def _measure(
    name: str,
    w: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    differs: np.ndarray,
    err: float,
    r0: int,
    allowed: float,
    worst: Worst,
    *,
    vector: bool,
) -> None:
    """The elements of a block that are not v's rounding (`differs`: their flat indices in the block),
    each against the bound (`err`: e; `start`: the block's weight before the changes, for the size of
    delta). A NaN in v is never its rounding's bits in a finite W' (the caller checks W' is finite
    first), so it is among them, and beyond the bound."""
    flat = torch.from_numpy(differs)
    rows, cols = np.divmod(differs, w.shape[1])
    # a few elements of a block, mostly: numpy's calls cost a tenth of torch's on arrays this small
    wv = torch.take(w, flat).to(torch.float64).numpy()
    vv = torch.take(v, flat).numpy()
    bits, emin = MANTISSA[w.dtype], EMIN[w.dtype]
    delta = vv - torch.take(start, flat).to(torch.float64).numpy()
    ulp = np.maximum(np.maximum(_ulp(wv, bits, emin), _ulp(vv, bits, emin)), _ulp(delta, bits, emin))
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(wv - vv)
        beyond = ~(diff <= allowed * ulp + err)  # NaN (in W' or v) counts as beyond
        worst.beyond += int(beyond.sum())
        worst.not_rounded += int((~(diff <= 0.5 * ulp + err)).sum())
        ulps = np.where(np.isnan(diff), np.inf, diff / ulp)
    if bool(beyond.any()) and name not in worst.failing:
        worst.failing.append(name)
    i = int(ulps.argmax())
    if float(ulps[i]) > worst.ulps:
        worst.ulps = float(ulps[i])
        worst.name = name
        worst.index = (r0 + int(rows[i]),) if vector else (r0 + int(rows[i]), int(cols[i]))
        worst.written, worst.expected = float(wv[i]), float(vv[i])


def _buffer(scratch: dict[torch.dtype, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reusable uninitialised buffer of `shape` from a thread's scratch, grown when too small."""
    numel = shape[0] * shape[1]
    held = scratch.get(dtype)
    if held is None or held.numel() < numel:
        scratch[dtype] = held = torch.empty(numel, dtype=dtype)
    return held[:numel].view(shape)


def _ulp(x: np.ndarray, bits: int, emin: int) -> np.ndarray:
    """The output grid's ulp at |x| (float64): 2^(max(floor(log2 |x|), emin) - bits + 1).

    Masking a float64's exponent bits leaves 2^floor(log2 |x|) exactly (0 for zero)."""
    power = np.bitwise_and(np.ascontiguousarray(x).view(np.int64), _EXPONENT64).view(np.float64)
    return np.maximum(power, 2.0**emin) * 2.0 ** (1 - bits)


class Expectation:
    """W + the ops' changes for any block of rows of one tensor, in the frame it is stored in, in
    float64; and a bound on the float64 error of its elements."""

    def __init__(self, t: PlannedTensor, w0: torch.Tensor, get: Getter) -> None:
        self.vector = len(t.shape) == 1
        self.start: torch.Tensor = w0.reshape(-1, 1) if self.vector else w0
        self.steps: list[tuple[str, tuple[torch.Tensor, ...]]] = []
        self.dora = any(op.kind == "dora" for op in t.ops)
        largest, spread, terms = _largest(self.start), 0.0, 0
        started = False
        for op in t.ops:
            if op.kind in WHOLE_TENSOR:
                r = get(op, 0)
                r = r.reshape(-1, 1) if self.vector else r
                if not started:
                    self.start = r
                else:
                    self.steps.append(("set", (r,)))
                largest = max(largest, _largest(r))
                continue
            started = True
            if op.kind == "rows":
                rows = get(op, 0).to(torch.float64)
                self.steps.append(("rows", (rows, torch.tensor(op.indices, dtype=torch.long))))
                largest = max(largest, _largest(rows))
                continue
            if op.layout == "bias":
                rows = get(op, 0).to(torch.float64).reshape(-1, 1) * op.scale
                cols = torch.ones(1, 1, dtype=torch.float64)
            else:
                a, b = get(op, 0).to(torch.float64), get(op, 1).to(torch.float64)
                if op.layout in EXPERT_LAYOUTS:  # one expert's B_e, A_e (gate/experts.py)
                    b, a = canonical_factors(op, a, b)
                if op.layout in ("linear", "experts"):
                    rows, cols = b * op.scale, a  # W [out, in] += s B A
                else:  # stored [in, out] or [vocab, dim]: W += s (B A)^T = (s A^T) B^T
                    rows, cols = (a.T * op.scale).contiguous(), b.T.contiguous()
            if rows.numel() and cols.numel():
                spread += float((rows.abs() @ cols.abs().amax(dim=1)).max())
            terms += rows.shape[1] + 2
            if op.kind != "dora":
                self.steps.append(("add", (rows, cols)))
                continue
            data: tuple[torch.Tensor, ...] = (rows, cols, get(op, 2).to(torch.float64).reshape(-1))
            if op.layout == "conv1d":  # output features are the stored columns: their norms, over all rows
                data += (_column_norms(self.start, rows, cols),)
            self.steps.append(("dora", data))
        self.absolute = 2 * max(terms, 1) * U64 * (largest + spread)  # e of the sums of products
        # DoRA: the rescale by m / ||W0 + dW|| multiplies that, and the norm's sum of squares adds its own
        self.relative = 2 * (self.start.shape[-1] + terms + 16) * U64 if self.dora else 0.0

    def rows(self, r0: int, r1: int, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(the expected values of rows r0:r1, in `out` unless DoRA makes a new tensor; the largest
        DoRA rescale factor among them, 1 without DoRA)."""
        acc = out
        acc.copy_(self.start[r0:r1])
        unmerged = acc.clone() if self.dora else acc  # DoRA's norm is of the weight before any delta
        scale = 1.0
        for kind, data in self.steps:
            if kind == "set":
                acc = data[0][r0:r1].to(torch.float64)
                unmerged = acc.clone() if self.dora else acc
            elif kind == "rows":
                rows, indices = data
                inside = (indices >= r0) & (indices < r1)
                if bool(inside.any()):
                    acc[indices[inside] - r0] = rows[inside]
            elif kind == "add":
                acc.addmm_(data[0][r0:r1], data[1])
            else:  # dora
                rows, cols, m = data[0], data[1], data[2]
                delta = rows[r0:r1] @ cols
                if len(data) > 3:  # conv1d: the stored columns are the output features
                    factor = (m / data[3]).reshape(1, -1)
                else:
                    factor = (m[r0:r1] / (unmerged + delta).pow(2).sum(dim=1).sqrt()).reshape(-1, 1)
                acc = factor * (acc + delta)
                scale = max(scale, float(factor.abs().max())) if factor.numel() else scale
        return acc, scale

    def error(self, block: torch.Tensor, scale: float) -> float:
        """The bound e on the float64 error of the expected values of a block (`block`, as `rows` gave
        it with `scale`)."""
        if not self.dora:
            return self.absolute
        return 2 * scale * self.absolute + self.relative * _largest(block)


def _differing(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """The flat indices where two tensors of one shape and dtype hold different bits (numpy's comparison
    of integer views and flatnonzero: 0.2 ns an element, where torch's `!=` and nonzero take 1.5)."""
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return np.flatnonzero(
        a.contiguous().view(integer).numpy().reshape(-1) != b.contiguous().view(integer).numpy().reshape(-1)
    )


def _largest(x: torch.Tensor) -> float:
    """max |x| without a temporary of x's size."""
    if not x.numel():
        return 0.0
    low, high = torch.aminmax(x)
    return max(-float(low), float(high))


def _column_norms(w0: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Norms of the columns of W0 + rows @ cols (a stored [in, out] weight's output features), a
    block of rows at a time."""
    squares = torch.zeros(w0.shape[1], dtype=torch.float64)
    for r0, r1 in mathops.row_blocks(w0.shape[0], w0.shape[1], BLOCK_ELEMENTS):
        block = w0[r0:r1].to(torch.float64) + rows[r0:r1] @ cols
        squares += (block * block).sum(dim=0)
    return squares.sqrt()
