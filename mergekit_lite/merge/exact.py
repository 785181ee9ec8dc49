"""Correctly rounded merge arithmetic: each output element is the exact value of
W + sum_i scale_i * (R_i @ C_i), rounded once to the output dtype (to nearest, ties to even).

Why: a correctly rounded result is a function of the inputs alone. It does not depend on which
BLAS kernel ran, in which order it summed, on the row blocking, the thread count, the executor,
the CPU model, or CPU against GPU, so a release rebuilt anywhere has the same bytes; and no
element is farther than half an ulp from the exact merge, which no rounding of PEFT's float32
arithmetic promises.

How, per block of rows (the fast path, one float64 GEMM for all the adapters, their factors side
by side):

- v = W + sum_i fl64(scale_i R_i) @ C_i in float64, by BLAS in whatever order it likes. The
  factors are float32, so with n = rank + 2 terms per adapter the standard dot-product bound
  |fl(x.y) - x.y| <= gamma_n |x|.|y| (any order, with or without FMA) gives
  |v - exact| <= E = 1.01 u sum_i n_i (max|W| + sum_i S_i), u = 2^-53, S_i the block's largest
  sum_k |fl64(scale_i R_i)_jk| max_l |C_i,kl|. E is doubled as a margin for its own rounding.
- float32 output: an element is certified when fl32(v - E) == fl32(v + E): rounding is monotone,
  so every value in between, the exact one included, rounds to that float.
- bfloat16 / float16 output: a = fl32(v) and out = round(a). Double rounding can only go wrong
  where a lands exactly on a midpoint of the output grid (midpoints are float32 numbers), and
  E is below a quarter of a's float32 ulp wherever |out| >= 2^28 E, so an element is certified
  when a is not such a midpoint and |out| is above that floor (and the grid is normal there).

The elements not certified are decided again, each in float64 with its own, much tighter bound
and a round-to-odd float32 step; any still undecided are computed exactly, in rationals. For
bfloat16 the tests flag segments of 64 elements (one int16 minimum per segment finds a midpoint),
so about one element in a thousand is decided again; for float16 (whose floor, the subnormals, is
not rare) single elements, about one in 200; for float32 about one in 100,000. Nothing here rounds anything the output keeps
except the one final rounding.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from fractions import Fraction

import torch

U64 = 2.0**-53  # float64 unit roundoff
SAFETY = 2.04  # 1.01 (gamma_n <= 1.01 n u while n u < 0.01) times 2: margin for rounding v +- E and E itself
INT32_MIN = -(2**31)
INT16_MIN = -(2**15)
SEGMENT = 64  # elements flagged together for `resolve` by the 16-bit outputs' midpoint and floor tests


@dataclass(frozen=True)
class Grid:
    """An output dtype's number grid, as the certification needs it."""

    bits: int  # significand bits, the hidden one included
    emin: int  # exponent of the smallest normal number
    emax: int
    shift: int  # left shift of float32 bits that keeps only the bits below the output's last one
    inf_bits: int  # magnitude bits of infinity in the output's integer view
    normal: float  # smallest |out| (with a factor-2 margin) where the midpoint test holds


GRIDS = {
    torch.float32: Grid(24, -126, 127, 0, 0x7F800000, 0.0),
    torch.bfloat16: Grid(8, -126, 127, 16, 0x7F80, 2.0**-125),
    torch.float16: Grid(11, -14, 15, 19, 0x7C00, 2.0**-13),
}


@dataclass(frozen=True)
class Term:
    """One LoRA delta in the stored frame of the weight: W += scale * rows @ cols.

    rows [m, r] and cols [r, n] are the adapter's float32 factors as saved (linear: B and A;
    Conv1D and embedding, stored transposed: A^T and B^T; a bias: the bias as one column, by a 1).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    scale: float
    scaled_rows: torch.Tensor  # fl64(scale * rows)
    cols64: torch.Tensor
    row_bound: torch.Tensor  # [m]: sum_k |scaled_rows_jk| * max_l |cols_kl|

    @property
    def terms(self) -> int:
        """Terms of one dot product of the GEMM that adds this delta (rank products plus the accumulator)."""
        return self.rows.shape[1] + 2


def term(rows: torch.Tensor, cols: torch.Tensor, scale: float) -> Term:
    """A Term from float32 factors (rows [m, r], cols [r, n])."""
    rows, cols = rows.to(torch.float32), cols.to(torch.float32)
    scaled = rows.to(torch.float64) * scale
    cols64 = cols.to(torch.float64)
    col_max = cols64.abs().amax(dim=1) if cols64.numel() else torch.zeros(cols64.shape[0], dtype=torch.float64)
    return Term(rows, cols, float(scale), scaled, cols64, scaled.abs() @ col_max)


@dataclass(frozen=True)
class Packed:
    """A tensor's terms as one float64 GEMM: W + [s_1 R_1, s_2 R_2, ...] @ [C_1; C_2; ...].

    One GEMM of rank sum_i r_i has n = sum_i r_i + 2 terms per dot product, no more than the sum
    of the terms' own counts, so the bound of the module's docstring holds with it."""

    scaled_rows: torch.Tensor  # [m, R]
    cols64: torch.Tensor  # [R, n]
    row_bound: torch.Tensor  # [m]: sum over the terms of their row bounds
    count: int  # terms of one dot product

    def spread(self, r0: int, r1: int) -> float:
        """The largest row bound of rows r0:r1 (S of the docstring, summed over the terms)."""
        return float(self.row_bound[r0:r1].max())


def pack(terms: list[Term]) -> Packed:
    """The terms of one tensor packed into one GEMM."""
    if len(terms) == 1:
        t = terms[0]
        return Packed(t.scaled_rows, t.cols64, t.row_bound, t.terms)
    return Packed(
        torch.cat([t.scaled_rows for t in terms], dim=1),
        torch.cat([t.cols64 for t in terms], dim=0),
        torch.stack([t.row_bound for t in terms]).sum(dim=0),
        sum(t.rows.shape[1] for t in terms) + 2,
    )


def without_rows(t: Term, indices: torch.Tensor) -> Term:
    """`t` with no contribution to the rows `indices` (rows later replaced whole, trainable tokens)."""
    rows = t.rows.clone()
    rows[indices] = 0
    return term(rows, t.cols, t.scale)


@dataclass
class Scratch:
    """One thread's reused buffers for `merge_block`, grown as needed."""

    f64: torch.Tensor
    f64b: torch.Tensor
    f32: torch.Tensor
    f32b: torch.Tensor
    i16: torch.Tensor

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> Scratch:
        def make(dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(0, dtype=dtype, device=device)

        return cls(make(torch.float64), make(torch.float64), make(torch.float32), make(torch.float32),
                   make(torch.int16))

    def fit(self, numel: int, out_dtype: torch.dtype) -> None:
        """Grow the buffers this output dtype uses to at least `numel` elements."""
        wanted = ("f64", "f64b", "f32", "f32b") if out_dtype == torch.float32 else ("f64", "f32", "i16")
        for name in wanted:
            buf = getattr(self, name)
            if buf.numel() < numel:
                setattr(self, name, torch.empty(0, dtype=buf.dtype, device=buf.device))
                setattr(self, name, torch.empty(numel, dtype=buf.dtype, device=buf.device))


Pending = torch.Tensor  # flat indices into the output of elements `resolve` decides


def merge_block(base: torch.Tensor, packed: Packed, r0: int, r1: int, out: torch.Tensor,
                scratch: Scratch) -> Pending | None | bool:
    """out[r0:r1] = W + the packed terms for rows r0:r1 of `base` ([m, n], any float dtype), rounded
    once, every element certified correct except those returned as pending for `resolve`.

    `out` is the whole [m, n] contiguous output (its dtype is the output's); the terms cover all m
    rows. Returns None when nothing is pending, False when a result is not finite (`out` is then
    unspecified), else the flat indices of the pending elements.
    """
    cols = base.shape[1]
    n = (r1 - r0) * cols
    if n == 0:
        return None
    scratch.fit(n, out.dtype)
    acc = scratch.f64[:n].view(r1 - r0, cols)
    acc.copy_(base[r0:r1])
    acc.addmm_(packed.scaled_rows[r0:r1], packed.cols64)
    spread = packed.spread(r0, r1)
    if not math.isfinite(spread):
        return False
    flat = _round_checked(acc, out[r0:r1], spread, packed.count, scratch)
    if flat is None or flat is False:
        return flat
    return flat + r0 * cols


def _bound(largest: float, spread: float, count: int) -> float:
    """E: the bound on |v - exact| in a block whose |v| is at most `largest` (see the module's docstring:
    |W| + sum_i S_i <= |v| + 2 sum_i S_i, up to E itself, which SAFETY covers)."""
    return SAFETY * U64 * count * (largest + 2 * spread)


def _round_checked(acc: torch.Tensor, out: torch.Tensor, spread: float, count: int,
                   s: Scratch) -> torch.Tensor | None | bool:
    """Round `acc` into `out`; the flat indices of the elements it could not certify (None: all
    certified; False: a result is not finite)."""
    n = acc.numel()
    grid = GRIDS[out.dtype]
    if out.dtype == torch.float32:
        out.copy_(acc)
        low, high = torch.aminmax(out)
        largest = max(-float(low), float(high))
        if not math.isfinite(largest):
            return False
        bound = _bound(largest * (1 + 2.0**-23), spread, count)
        t64 = s.f64b[:n].view(acc.shape)
        lo, hi = s.f32[:n].view(acc.shape), s.f32b[:n].view(acc.shape)
        lo.copy_(torch.sub(acc, bound, out=t64))
        hi.copy_(torch.add(acc, bound, out=t64))
        return None if torch.equal(lo, hi) else (lo != hi).view(-1).nonzero(as_tuple=True)[0]
    a = s.f32[:n].view(acc.shape)
    a.copy_(acc)
    out.copy_(a)
    magnitude = torch.bitwise_and(out.view(torch.int16), 0x7FFF, out=s.i16[:n].view(acc.shape))
    low, high = (int(x) for x in torch.aminmax(magnitude))
    if high >= grid.inf_bits:
        return False
    bound = _bound(_from_bits(high, out.dtype) * (1 + 2.0**-7), spread, count)
    floor = _bits_at_least(max(bound * 2.0**28, grid.normal), out.dtype)
    # a is a midpoint when its float32 bits below the output's last one are 100...0. For bfloat16
    # those are a's low 16 bits, INT16_MIN as an int16: a segment holds one when the minimum of its
    # int16 halves is INT16_MIN (a high half is INT16_MIN only for -0.0: flagged too, harmlessly).
    # Flagged segments (about one element in a thousand lies in one) are decided element by element
    # by `resolve`.
    if out.dtype == torch.float16:  # its floor (the subnormals) is not rare: flag elements, not segments
        below = torch.bitwise_left_shift(a.view(torch.int32), grid.shift)
        return ((below == INT32_MIN) | (magnitude < floor)).view(-1).nonzero(as_tuple=True)[0]
    seg = SEGMENT if n % SEGMENT == 0 else acc.shape[1]
    hit = a.view(torch.int16).view(-1, 2 * seg).amin(dim=1) == INT16_MIN
    if low < floor:
        hit |= magnitude.view(-1, seg).amin(dim=1) < floor
    (segments,) = hit.nonzero(as_tuple=True)
    if segments.numel() == 0:
        return None
    return (segments.unsqueeze(1) * seg + torch.arange(seg, device=segments.device)).view(-1)


def _from_bits(bits: int, dtype: torch.dtype) -> float:
    """The 16-bit float whose magnitude bits are `bits`."""
    if dtype == torch.bfloat16:
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def _bits_at_least(value: float, dtype: torch.dtype) -> int:
    """Magnitude bits of a 16-bit float >= value (those of infinity when none is)."""
    grid = GRIDS[dtype]
    if not value < _from_bits(grid.inf_bits - 1, dtype):
        return grid.inf_bits
    if dtype == torch.bfloat16:
        bits = struct.unpack("<I", struct.pack("<f", value))[0] >> 16  # truncated: at most value
    else:
        bits = struct.unpack("<H", struct.pack("<e", value))[0]  # nearest: within one step
    return min(bits + 1, grid.inf_bits)


def resolve(base: torch.Tensor, terms: list[Term], out: torch.Tensor, pending: list[Pending]) -> None:
    """Decide the pending elements of `out` ([m, n]) again, each in float64 with its own bound, exactly
    where that is not enough."""
    if not pending:
        return
    flat = torch.cat(pending)
    j, col = flat // base.shape[1], flat % base.shape[1]
    w = base[j, col].to(torch.float64)
    v, magnitude = w.clone(), w.abs()
    for t in terms:
        products = t.scaled_rows[j] * t.cols64[:, col].T
        v += products.sum(dim=1)
        magnitude += products.abs().sum(dim=1)
    e = SAFETY * U64 * sum(t.terms for t in terms) * magnitude
    lo, hi = correct_round(v - e, out.dtype), correct_round(v + e, out.dtype)
    same = lo == hi
    target = out.view(-1)
    target[flat[same]] = lo[same]
    for index, jj, cc in zip(flat[~same].tolist(), j[~same].tolist(), col[~same].tolist()):
        exact = Fraction(float(base[jj, cc]))
        for t in terms:
            dot = sum(Fraction(float(t.rows[jj, k])) * Fraction(float(t.cols[k, cc])) for k in range(t.rows.shape[1]))
            exact += Fraction(t.scale) * dot
        target[index] = round_fraction(exact, out.dtype)


def correct_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `x` correctly rounded to `dtype` (float32 directly; 16-bit through round-to-odd float32,
    which leaves the second rounding the only one that counts)."""
    f = x.to(torch.float32)
    if dtype == torch.float32:
        return f
    back = f.to(torch.float64)
    inexact = back != x
    away = back.abs() > x.abs()
    bits = f.view(torch.int32) - (inexact & away).to(torch.int32)
    bits = bits | inexact.to(torch.int32)
    return bits.view(torch.float32).to(dtype)


def round_fraction(q: Fraction, dtype: torch.dtype) -> float:
    """The rational `q` rounded to nearest `dtype` number, ties to even (inf past the largest)."""
    if q == 0:
        return 0.0
    grid = GRIDS[dtype]
    sign, a = (-1.0 if q < 0 else 1.0), abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if a < Fraction(2) ** e:
        e -= 1
    quantum = max(e, grid.emin) - grid.bits + 1
    steps = round(a / Fraction(2) ** quantum)  # Fraction.__round__: half to even
    value = steps * Fraction(2) ** quantum
    if value >= Fraction(2) ** (grid.emax + 1):
        return sign * math.inf
    return sign * float(steps) * 2.0**quantum


def merge(base: torch.Tensor, terms: list[Term], out: torch.Tensor, blocks: list[tuple[int, int]] | None = None,
          scratch: Scratch | None = None) -> bool:
    """out = W + sum of the terms, correctly rounded, block by block of rows (one block: the whole
    tensor); False when a result is not finite."""
    if not terms:  # one rounding of the base (float64 through round-to-odd, as everywhere)
        out.copy_(correct_round(base, out.dtype) if base.dtype == torch.float64 else base)
        return True
    scratch = scratch or Scratch.empty(base.device)
    packed = pack(terms)
    pending = []
    for r0, r1 in blocks or [(0, base.shape[0])]:
        part = merge_block(base, packed, r0, r1, out, scratch)
        if part is False:
            return False
        if part is not None:
            pending.append(part)
    resolve(base, terms, out, pending)
    return True


# ---------------------------------------------------------------------------------------------
# DoRA: a square root and a division stand between the factors and the result, so it is not
# certified against the exact value; it is evaluated in float64 by elementwise operations in a
# fixed order (products of float32 factors are exact in float64, so FMA or not gives the same
# bits), which makes the float64 result, and so its one rounding, the same on every machine.


def fixed_order_delta(t: Term) -> torch.Tensor:
    """scale * rows @ cols in float64, summed over the rank in order: the same bits on any machine."""
    delta = torch.zeros(t.rows.shape[0], t.cols.shape[1], dtype=torch.float64, device=t.cols64.device)
    rows64 = t.rows.to(torch.float64)
    for k in range(t.rows.shape[1]):
        delta.addcmul_(rows64[:, k : k + 1], t.cols64[k : k + 1, :])  # exact products, one rounding each
    return delta.mul_(t.scale)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row of float64 `x`, the squares summed pairwise in a fixed tree."""
    s = x * x
    while s.shape[1] > 1:
        half = s.shape[1] // 2
        s = torch.cat([s[:, :half] + s[:, half : 2 * half], s[:, 2 * half :]], dim=1)
    return s[:, 0].sqrt() if s.shape[1] else torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


def dora_rescale(acc: torch.Tensor, unmerged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA, as PEFT's DoraLinearVariant.merge: (m / ||W0 + dW||_row) * (acc + dW), in float64 (rows are
    output features; pass transposed views for a weight stored [in, out])."""
    factor = magnitude.to(torch.float64) / row_norms(unmerged + delta)
    return factor.unsqueeze(1) * (acc + delta)
