"""Gate check 2b, every element: each changed tensor against W + delta computed here.

The probes of algebra.py see a tensor through a few products W'x, so one destroyed weight among
millions can hide in them (a residual of 7.7 ulps under a threshold of 16). This check compares
every element of a changed tensor with its expected value v, computed from the base and the
adapter factors as stored (gate/expectation.py), a block of rows at a time (one block of v per
thread at most), by code of its own: not merge/exact.py's, whose bytes it checks.

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
many elements are not the correctly rounded value (past half an ulp + e), and the worst of those
elements' distance in ulps (0 when there is none).

e bounds the float64 evaluation's own error: for sums of products, 2 n u (max |W| + max_i S_i)
over the tensor (n terms per dot product, u = 2^-53; S_i = the sum over the ops of sum_k |s B_ik|
max_l |A_kl|, which bounds |delta_ij| and the dot products' sums of |terms| in row i); for DoRA a
relative 2 (columns + rank + 8) u of the rescaled value on top (the row norm's sum of squares).

Cost: most elements are exactly v rounded to the output dtype, which one comparison of the block
with v's rounding shows; only the elements that differ are measured, one by one.

The float32 evaluation. For a bfloat16 or float16 output of a tensor without DoRA whose inputs are
all exact in float32 (stored in 16 or 32 bits), with element_ulps >= 1 and torch's float32 products
IEEE's (rows.float32_exact: no TF32 or bfloat16 passes), the blocks are evaluated in float32: v32,
from W copied to float32 and the factors in float32 with the scale folded in, fl32(fl64(s B)), by
addmm, in blocks of BLOCK_ELEMENTS32 (thin products of more rows run faster: docs/performance.md).
For any order of the sums, FMA or not (|fl(x . y) - x . y| <= gamma_n |x| . |y|),

    |v32_ij - v_ij| <= E_ij = 2 N u (|R_ij| + S_i),     u = 2^-24,

N being the terms per dot product summed over the ops (rank + 3: one more than float64's n, for s B
rounded to float32), R the value the deltas are added to (W, or a replacement: |R_ij| <= |v_ij| + S_i)
and the 2 covering the second-order terms and gradual underflow (at most N 2^-150, far below the
smallest normal's ulp). An element whose bits are v32's rounding passes without being measured:

    |W'_ij - v_ij| <= ulp(W'_ij) / 2 + E_ij,

and that is within the bound above (E_ij < 1 ulp) wherever
  (i)  2 N u 2^p <= 1/4, p the output's significand bits: N <= 8192 for bfloat16, 1024 for float16
       (else float64 is used), and
  (ii) ulp(W'_ij) >= 16 N u S_i.
Proof: with q = 2 N u, |R| <= |v| + S and |v| <= |W'| + ulp/2 + E give E (1 - q) <= q |W'| + q ulp/2
+ 2 q S; |W'| < 2^p ulp(W'), so (i) makes q |W'| <= ulp/4, and (ii) makes 2 q S <= ulp/4: E <= ulp
(1/2 + q/2) / (1 - q) < ulp. An element that fails (ii) is small against its row's spread S_i (below
2^(p-1) 16 N u S_i; telling them apart would cost a pass over every element, and measuring them
would cost more than the float32 evaluation saves, as S_i is loose); it passes unmeasured within
ulp/2 + E_ij, which is per element, not per tensor: a mantissa bit flipped in an element 1e-5 of the tensor's largest is
still caught. And whatever the element's size, a damaged one passes unmeasured only if its bits are
exactly v32's rounding, that is, float32's evaluation of the right value.

Every element that is not v32's rounding is measured against v computed in float64 for it alone
(Expectation.at: the float64 sums in another order, with the same e), so the figures are float64's;
a block where more than 1 in MANY differ (a merge rounded another way) is evaluated in float64 whole.
What float32 cannot tell: a v within E of a rounding boundary whose element is v32's rounding counts
as correctly rounded; it is at most an ulp from it, and within the bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mergekit_lite.gate.expectation import BLOCK_ELEMENTS, Expectation, Getter
from mergekit_lite.merge import mathops
from mergekit_lite.plan.plan import PlannedTensor

MANTISSA = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
EMIN = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}
_EXPONENT64 = 0x7FF0000000000000
# float32 blocks of 2^19 elements (2 MB): thin products of more rows run faster (docs/performance.md),
# and the L3 cache holds the block, its rounding and W'
BLOCK_ELEMENTS32 = 2**19
# a float32-path block with more differing elements than 1 in MANY is redone in float64 whole: cheaper
# than element by element (a merge rounded another way: PEFT's, in the output dtype)
MANY = 64


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
    single: int = 0  # tensors whose blocks were evaluated in float32
    measured: int = 0  # elements measured one by one (not passed on their bits)
    failing: list[str] = field(default_factory=list)  # tensors with elements past the bound, in order

    def add(self, other: Worst) -> None:
        if other.ulps > self.ulps:
            self.ulps, self.name, self.index = other.ulps, other.name, other.index
            self.written, self.expected = other.written, other.expected
        self.beyond += other.beyond
        self.not_rounded += other.not_rounded
        self.elements += other.elements
        self.tensors += other.tensors
        self.single += other.single
        self.measured += other.measured
        self.failing += [n for n in other.failing if n not in self.failing]


class ElementCheck:
    """Runs the elementwise check tensor by tensor, its blocks shared among `threads` threads."""

    def __init__(self, threads: int, element_ulps: float) -> None:
        self.threads = mathops.BlockThreads(threads, "mergekit-elements")
        self.scratch: list[dict[torch.dtype, torch.Tensor]] = [{} for _ in range(self.threads.threads)]
        self.element_ulps = element_ulps
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
        single = expect.single(out.dtype, self.element_ulps)
        blocks = mathops.row_blocks(out.shape[0], out.shape[1], BLOCK_ELEMENTS32 if single else BLOCK_ELEMENTS)
        parts = mathops.split(blocks, len(self.scratch))
        calls = [(t.name, out, expect, single, part, self.allowed, self.scratch[i]) for i, part in enumerate(parts)]
        for worst in self.threads.map(_check_blocks, calls):
            self.total.add(worst)
        self.total.tensors += 1
        self.total.single += single


def _check_blocks(
    name: str,
    out: torch.Tensor,
    expect: Expectation,
    single: bool,
    blocks: list[tuple[int, int]],
    allowed: float,
    scratch: dict[torch.dtype, torch.Tensor],
) -> Worst:
    """One thread's share: its blocks' worst element and counts. `single`: v is evaluated in float32, and
    the elements that differ from its rounding are measured against float64 values of their own, all at
    once (a block with many of them: against the block in float64)."""
    worst = Worst()
    pending: list[np.ndarray] = []  # flat indices in `out`, float32 path
    for r0, r1 in blocks:
        shape = (r1 - r0, out.shape[1])
        if not single:
            v, scale = expect.rows(r0, r1, _buffer(scratch, shape, torch.float64))
        else:
            v = expect.rows32(r0, r1, _buffer(scratch, shape, torch.float32))
        w = out[r0:r1]
        worst.elements += w.numel()
        rounded = _buffer(scratch, w.shape, w.dtype)
        rounded.copy_(v)
        # the elements whose bits are not v's rounding (float64: torch's, an ulp off now and then by double
        # rounding through float32): numpy on integer views, one pass over 16-bit data
        differs = _differing(rounded, w)
        if not differs.size:  # every element is v rounded: within half an ulp (+ e)
            continue
        if single and differs.size * MANY <= w.numel():
            pending.append(differs + r0 * out.shape[1])
            continue
        if single:
            v, scale = expect.rows(r0, r1, _buffer(scratch, shape, torch.float64))
        flat = torch.from_numpy(differs)
        start = expect.start[r0:r1]
        values = (torch.take(w, flat), torch.take(v, flat), torch.take(start, flat))
        _measure(name, out, values, differs + r0 * out.shape[1], expect.error(v, scale), allowed, worst, expect.vector)
    if pending:
        flat = np.concatenate(pending)
        rows, cols = np.divmod(flat, out.shape[1])
        index = torch.from_numpy(flat)
        v = expect.at(torch.from_numpy(rows), torch.from_numpy(cols))
        values = (torch.take(out, index), v, torch.take(expect.start, index))
        _measure(name, out, values, flat, expect.absolute, allowed, worst, expect.vector)
    return worst


def _measure(
    name: str,
    out: torch.Tensor,
    values: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    flat: np.ndarray,
    err: float,
    allowed: float,
    worst: Worst,
    vector: bool,
) -> None:
    """Some elements of the tensor `out` that are not v's rounding (`flat`: their flat indices; `values`:
    their W', v in float64 and the weight before the changes, for the size of delta), each against the
    bound (`err`: e). A NaN in v is never its rounding's bits in a finite W' (the caller checks W' is
    finite first), so it is among them, and beyond the bound. The worst is of the elements past half an
    ulp (+ e), those that are not the correctly rounded value: whether a correctly rounded one was
    measured or passed on its bits (which depends on the path and on double rounding) changes nothing."""
    # a few elements of a block, mostly: numpy's calls cost a tenth of torch's on arrays this small
    wv, vv = values[0].to(torch.float64).numpy(), values[1].numpy()
    bits, emin = MANTISSA[out.dtype], EMIN[out.dtype]
    delta = vv - values[2].to(torch.float64).numpy()
    ulp = np.maximum(np.maximum(_ulp(wv, bits, emin), _ulp(vv, bits, emin)), _ulp(delta, bits, emin))
    worst.measured += flat.size
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(wv - vv)
        beyond = ~(diff <= allowed * ulp + err)  # NaN (in W' or v) counts as beyond
        off = ~(diff <= 0.5 * ulp + err)
        worst.beyond += int(beyond.sum())
        worst.not_rounded += int(off.sum())
        ulps = np.where(off, np.where(np.isnan(diff), np.inf, diff / ulp), 0.0)
    if bool(beyond.any()) and name not in worst.failing:
        worst.failing.append(name)
    i = int(ulps.argmax())
    if float(ulps[i]) > worst.ulps:
        row, col = divmod(int(flat[i]), out.shape[1])
        worst.ulps = float(ulps[i])
        worst.name = name
        worst.index = (row,) if vector else (row, col)
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


def _differing(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """The flat indices where two tensors of one shape and dtype hold different bits (numpy's comparison
    of integer views and flatnonzero: 0.2 ns an element, where torch's `!=` and nonzero take 1.5)."""
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return np.flatnonzero(
        a.contiguous().view(integer).numpy().reshape(-1) != b.contiguous().view(integer).numpy().reshape(-1)
    )
