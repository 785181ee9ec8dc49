"""The gate's expected values of a changed tensor, W + the ops' changes, from the base and the adapter
factors as stored, by code of its own (not merge/exact.py's, whose bytes the checks hold against
them): for a block of rows in float64 (`rows`) or float32 (`rows32`), or for a few elements in
float64 (`at`). gate/elementwise.py states the bounds on their errors and proves when float32 may
stand in for float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergekit_lite.gate.experts import canonical_factors
from mergekit_lite.gate.rows import float32_exact
from mergekit_lite.merge import mathops
from mergekit_lite.plan.plan import Op, PlannedTensor
from mergekit_lite.vocabulary import EXPERT_LAYOUTS, WHOLE_TENSOR

BLOCK_ELEMENTS = 2**17  # float64 elements of a block: v and its rounding stay near the L2 cache
U64 = 2.0**-53
U32 = 2.0**-24
EXACT32 = (torch.float32, torch.bfloat16, torch.float16)  # stored dtypes float32 holds exactly
SIXTEEN = {torch.bfloat16: 8, torch.float16: 11}  # the outputs float32 may stand in for: significand bits

Getter = Callable[[Op, int], torch.Tensor]  # (op, i): the op's i-th adapter tensor, as stored


class Expectation:
    """W + the ops' changes for any block of rows of one tensor, in the frame it is stored in; and
    bounds on the float64 and float32 errors of its elements."""

    def __init__(self, t: PlannedTensor, w0: torch.Tensor, get: Getter) -> None:
        self.vector = len(t.shape) == 1
        self.start: torch.Tensor = w0.reshape(-1, 1) if self.vector else w0
        self.steps: list[tuple[str, tuple[torch.Tensor, ...]]] = []
        self.dora = any(op.kind == "dora" for op in t.ops)
        self.exact32 = w0.dtype in EXACT32  # every input is exact in float32 (rows32 may be used)
        largest, terms, spreads = _largest(self.start), 0, []
        self.terms32 = 0  # N of the float32 bound: terms per dot product, over the ops
        started = False
        for op in t.ops:
            if op.kind in WHOLE_TENSOR:
                r = get(op, 0)
                r = r.reshape(-1, 1) if self.vector else r
                self.exact32 &= r.dtype in EXACT32
                if not started:
                    self.start = r
                else:
                    self.steps.append(("set", (r,)))
                largest = max(largest, _largest(r))
                continue
            started = True
            if op.kind == "rows":
                stored = get(op, 0)
                self.exact32 &= stored.dtype in EXACT32
                rows = stored.to(torch.float64)
                self.steps.append(("rows", (rows, torch.tensor(op.indices, dtype=torch.long))))
                largest = max(largest, _largest(rows))
                continue
            if op.layout == "bias":
                stored = get(op, 0)
                self.exact32 &= stored.dtype in EXACT32
                rows = stored.to(torch.float64).reshape(-1, 1) * op.scale
                cols = torch.ones(1, 1, dtype=torch.float64)
            else:
                a, b = get(op, 0), get(op, 1)
                self.exact32 &= a.dtype in EXACT32 and b.dtype in EXACT32
                a, b = a.to(torch.float64), b.to(torch.float64)
                if op.layout in EXPERT_LAYOUTS:  # one expert's B_e, A_e (gate/experts.py)
                    b, a = canonical_factors(op, a, b)
                if op.layout in ("linear", "experts"):
                    rows, cols = b * op.scale, a  # W [out, in] += s B A
                else:  # stored [in, out] or [vocab, dim]: W += s (B A)^T = (s A^T) B^T
                    rows, cols = (a.T * op.scale).contiguous(), b.T.contiguous()
            if rows.numel() and cols.numel():
                spreads.append(rows.abs() @ cols.abs().amax(dim=1))
            terms += rows.shape[1] + 2
            self.terms32 += rows.shape[1] + 3  # and s B's rounding to float32
            if op.kind != "dora":
                self.steps.append(("add", (rows, cols)))
                continue
            data: tuple[torch.Tensor, ...] = (rows, cols, get(op, 2).to(torch.float64).reshape(-1))
            if op.layout == "conv1d":  # output features are the stored columns: their norms, over all rows
                data += (_column_norms(self.start, rows, cols),)
            self.steps.append(("dora", data))
        # S_i: per row, sum over the ops of sum_k |s B_ik| max_l |A_kl|, which bounds |delta_ij|
        self.spread_rows = sum(spreads) if spreads else torch.zeros(self.start.shape[0], dtype=torch.float64)
        spread = float(self.spread_rows.max()) if self.spread_rows.numel() else 0.0
        self.absolute = 2 * max(terms, 1) * U64 * (largest + spread)  # e of the sums of products
        # DoRA: the rescale by m / ||W0 + dW|| multiplies that, and the norm's sum of squares adds its own
        self.relative = 2 * (self.start.shape[-1] + terms + 16) * U64 if self.dora else 0.0
        self.steps32: list[tuple[str, tuple[torch.Tensor, ...]]] = []

    def rows(self, r0: int, r1: int, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(the expected values of rows r0:r1 in float64, in `out` unless DoRA makes a new tensor; the
        largest DoRA rescale factor among them, 1 without DoRA)."""
        acc = out
        acc.copy_(self.start[r0:r1])
        unmerged = acc.clone() if self.dora else acc  # DoRA's norm is of the weight before any delta
        scale = 1.0
        for kind, data in self.steps:
            if kind == "set":
                acc = data[0][r0:r1].to(torch.float64)
                unmerged = acc.clone() if self.dora else acc
            elif kind == "rows":
                _replace_rows(acc, data[0], data[1], r0, r1)
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

    def single(self, dtype: torch.dtype, element_ulps: float) -> bool:
        """Whether float32 may stand in for float64 for a `dtype` output (elementwise.py, the float32
        evaluation); if so, rows32 is made ready."""
        if dtype not in SIXTEEN or self.dora or not self.exact32 or element_ulps < 1 or not float32_exact():
            return False
        if self.terms32 > 2 ** (21 - SIXTEEN[dtype]):  # condition (i)
            return False
        self.steps32 = []
        for kind, data in self.steps:
            if kind == "rows":
                data = (data[0].to(torch.float32), data[1])
            elif kind == "add":  # the scale folded into the rows: fl32(fl64(s B))
                data = (data[0].to(torch.float32), data[1].to(torch.float32))
            self.steps32.append((kind, data))
        return True

    def rows32(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """v32, the expected values of rows r0:r1 evaluated in float32 (once `single` said yes), in `out`."""
        out.copy_(self.start[r0:r1])
        for kind, data in self.steps32:
            if kind == "set":
                out.copy_(data[0][r0:r1])
            elif kind == "rows":
                _replace_rows(out, data[0], data[1], r0, r1)
            else:  # add
                out.addmm_(data[0][r0:r1], data[1])
        return out

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The expected values of the elements (rows[m], cols[m]) in float64, each summed on its own (the
        sums of `rows` in another order: e bounds their error too). Not for DoRA."""
        acc = self.start[rows, cols].to(torch.float64)
        for kind, data in self.steps:
            if kind == "set":
                acc = data[0][rows, cols].to(torch.float64)
            elif kind == "rows":
                where = torch.full((self.start.shape[0],), -1, dtype=torch.long)
                where[data[1]] = torch.arange(data[1].numel())
                found = where[rows]
                hit = found >= 0
                acc[hit] = data[0][found[hit], cols[hit]]
            elif kind == "add":
                acc = acc + (data[0][rows] * data[1][:, cols].T).sum(dim=1)
            else:
                raise ValueError("Expectation.at: DoRA's rescale is of whole rows")
        return acc


def _replace_rows(acc: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor, r0: int, r1: int) -> None:
    """The token rows among r0:r1 replaced in the block `acc`."""
    inside = (indices >= r0) & (indices < r1)
    if bool(inside.any()):
        acc[indices[inside] - r0] = rows[inside].to(acc.dtype)


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
