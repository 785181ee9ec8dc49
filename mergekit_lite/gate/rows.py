"""The gate's row passes: W x and the spread one-ulp errors in W would cause, a block of rows at a
time, on several threads (gate/algebra.py uses them for W x, W0 x and DoRA's row norms).

A row's figures do not depend on the number of threads or on BLOCK_ELEMENTS' value: whole blocks
go to each thread, and each block is upcast exactly (a 16-bit weight is exact in float32).
"""

from __future__ import annotations

import math

import torch

from mergekit_lite.merge import mathops

# rows are upcast in blocks of about this many elements: thin products of more rows run faster, and a
# block's passes stay in the L3 cache (docs/performance.md); smaller, down to BLOCK_LEAST, where a
# tensor would otherwise leave a thread without a block
BLOCK_ELEMENTS = 2**20
BLOCK_LEAST = 2**18
MANTISSA = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8, torch.float64: 53}
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
ULP_SCALE = {dtype: 2.0 ** (2 - 2 * bits) for dtype, bits in MANTISSA.items()}  # ulp^2 / (2^(e-1))^2
_EXPONENT_MASK = {
    torch.float32: 0x7F800000,
    torch.float16: 0x7C00,
    torch.bfloat16: 0x7F80,
    torch.float64: 0x7FF0000000000000,
}


def work_dtype(w: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit weights, float64 otherwise (and wherever float32_exact() is false).

    A 16-bit W is exact in float32, and float32's rounding in W x (2^-24 relative, times the
    square root of the row length) is 2^-16 of the 16-bit ulps the check measures in: far below
    what it can see, at half float64's cost. float32 weights need float64.
    """
    sixteen = w.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if sixteen and float32_exact() else torch.float64


def float32_exact() -> bool:
    """Whether torch's float32 matrix products round as IEEE float32 does: a user process may have
    allowed TF32 or bfloat16 passes (torch.set_float32_matmul_precision, the fp32_precision settings),
    which round inputs to 10 or 7 bits, and the gate's float32 bounds would not hold."""
    if torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32:
        return False
    backends = torch.backends
    settings = (backends, getattr(backends, "mkldnn", None), getattr(getattr(backends, "mkldnn", None), "matmul", None))
    return all(getattr(s, "fp32_precision", "none") in ("none", "ieee") for s in settings if s is not None)


def matmul(w: torch.Tensor, x: torch.Tensor, transposed: bool, rows: RowPasses | None = None) -> torch.Tensor:
    """W x (or W^T x) in float64, computed a block of rows at a time in work_dtype(W)."""
    product, _ = (rows or RowPasses(1)).run(w, x, transposed, work_dtype(w), spread=False)
    return product.to(torch.float64)


def matmul_and_ulp_scale(
    w: torch.Tensor, x: torch.Tensor, transposed: bool, work: torch.dtype | None = None, rows: RowPasses | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W x, sqrt(sum_j (ulp(W_ij) x_j)^2)) in float64, in one pass over W: the product, and the
    spread of it that one-ulp errors in W would cause. A float tensor's ulp is a power of two
    read off its exponent bits (see exponent_squared)."""
    work = work or work_dtype(w)
    product, spread = (rows or RowPasses(1)).run(w, x, transposed, work, spread=True)
    assert spread is not None
    if work != torch.float64 and not (
        bool((spread > 0).all()) and mathops.all_finite(spread) and mathops.all_finite(product)
    ):
        # bfloat16 rows of values below 2^-63 (or above 2^63) have ulps whose squares under- (over-)
        # flow float32: redo in float64
        return matmul_and_ulp_scale(w, x, transposed, torch.float64, rows)
    return product.to(torch.float64), spread.to(torch.float64).sqrt()


class RowPasses:
    """One pass over a weight's rows, a block at a time: W x and, if asked, sum_j ulp(W_ij)^2 x_j^2.

    The blocks are shared among `threads` threads (mathops.BlockThreads), each with its own
    scratch blocks, reused from tensor to tensor: the check's cost is passes over
    cache-sized blocks (upcast, exponent mask, square, two thin products), which one team of
    intra-op threads mostly spends waking up for, and fresh temporaries per block about double
    (docs/performance.md). Whole blocks go to each thread, so a row's figures do not depend on the thread count (W^T x, summed over
    rows, does, by float32 rounding).
    """

    def __init__(self, threads: int) -> None:
        self.threads = mathops.BlockThreads(threads, "mergekit-algebra")
        self.scratch: list[dict[tuple[str, torch.dtype], torch.Tensor]] = [{} for _ in range(self.threads.threads)]

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
        x2 = (xw * xw).mul_(ULP_SCALE[w.dtype])
        size = min(BLOCK_ELEMENTS, max(BLOCK_LEAST, w.numel() // len(self.scratch)))
        parts = mathops.split(mathops.row_blocks(w.shape[0], w.shape[1], size), len(self.scratch))
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
    scratch: dict[tuple[str, torch.dtype], torch.Tensor],
    product: torch.Tensor,
    square: torch.Tensor | None,
) -> None:
    """matmul's and matmul_and_ulp_scale's work on some row blocks of W, in scratch buffers.

    Positional, as BlockThreads.map calls it with one tuple of arguments per part.

    W x is computed as (x^T W^T)^T: MKL's product of a block by a thin x (4 columns) takes 3.5 times
    as long as the same product laid out with the block's rows as the output's columns (343 against
    95 us a 2^18-element float32 block, the copy back included; 351 against 193 in float64)."""
    work = xw.dtype
    xt = None if transposed else xw.T.contiguous()
    x2t = None if transposed or square is None else x2.T.contiguous()
    for start, stop in blocks:
        block = _buffer(scratch, (stop - start, w.shape[1]), work)
        block.copy_(w[start:stop])
        if transposed:
            product.addmm_(block.T, xw[start:stop])
        else:
            _thin_product(xt, block, product[start:stop], scratch)
        if square is None:
            continue
        ulp2 = exponent_squared(block, dtype, out=block)  # in place: the block is done with; x2 carries ULP_SCALE
        if transposed:
            square.addmm_(ulp2.T, x2[start:stop])
        else:
            _thin_product(x2t, ulp2, square[start:stop], scratch)


def _thin_product(xt: torch.Tensor, block: torch.Tensor, out: torch.Tensor, scratch: dict) -> None:
    """out = block @ xt^T, computed as xt @ block^T into a scratch buffer and copied back transposed."""
    thin = _buffer(scratch, (xt.shape[0], block.shape[0]), xt.dtype, "thin")
    torch.mm(xt, block.T, out=thin)
    out.copy_(thin.T)


def _buffer(
    scratch: dict[tuple[str, torch.dtype], torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    role: str = "block",
) -> torch.Tensor:
    """A reusable uninitialised buffer of `shape` from a thread's scratch (one per role and dtype), grown
    when too small."""
    numel = math.prod(shape)
    held = scratch.get((role, dtype))
    if held is None or held.numel() < numel:
        scratch[role, dtype] = held = torch.empty(numel, dtype=dtype)
    return held[:numel].view(shape)


def exponent_squared(block: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """(2^(e-1))^2 for the `dtype` values W held exactly in `block` (float32 or float64), into `out`
    when given: ulp(W_ij)^2 / ULP_SCALE[dtype], where ulp(v) = 2^(e - mantissa bits of dtype) for
    |v| = m 2^e, m in [0.5, 1), and the smallest normal's ulp for zeros and subnormals. The row
    passes fold ULP_SCALE, a power of two, into x^2: the same products, one pass fewer.

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


def blocks(w: torch.Tensor):
    """(first row, the rows of W from there in float64), BLOCK_LEAST elements at a time."""
    rows = max(1, BLOCK_LEAST // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        yield start, w[start : start + rows].to(torch.float64)
