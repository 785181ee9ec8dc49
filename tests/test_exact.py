"""merge/exact.py against rational arithmetic: every element is the exact merge rounded once.

Small random cases over the output dtypes, bases in every float dtype, several adapters, rows of
zeros in B, tiny weights; the same with the fast path's bound inflated so that the per-element
and rational fallbacks decide most elements; and the rounding helpers on their edge cases.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from mergekit_lite.merge import exact, mathops

PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
         (torch.float32, torch.float16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32)]
SHAPES = {  # rows, cols, rank, adapters, base scale, factor scale, zero every other row of B
    "plain": (40, 50, 4, 1, 0.02, 0.01, False),
    "two": (30, 37, 8, 2, 0.02, 0.01, False),
    "three_sparse": (20, 20, 3, 3, 0.02, 0.01, True),
    "tiny_weights": (20, 30, 4, 1, 1e-5, 1e-3, False),
}


def _case(shape: str, src: torch.dtype, seed: int):
    rows, cols, rank, adapters, w_scale, f_scale, sparse = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=g) * w_scale).to(src)
    terms = []
    for scale in (2.0, -0.37, 0.6)[:adapters]:
        b, a = torch.randn(rows, rank, generator=g) * f_scale, torch.randn(rank, cols, generator=g) * f_scale
        if sparse:
            b[::2] = 0
        terms.append(exact.term(b, a, scale))
    return base, terms


def _exact(base: torch.Tensor, terms: list[exact.Term], dtype: torch.dtype) -> torch.Tensor:
    rows, cols = base.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for j in range(rows):
        for col in range(cols):
            q = Fraction(float(base[j, col]))
            for t in terms:
                q += Fraction(t.scale) * sum(Fraction(float(t.rows[j, k])) * Fraction(float(t.cols[k, col]))
                                             for k in range(t.rows.shape[1]))
            out[j, col] = exact.round_fraction(q, dtype)
    return out.to(dtype)


@pytest.mark.parametrize("inflate", [1.0, 1e9, 1e14], ids=["fast", "per-element", "rational"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("src,dst", PAIRS, ids=[f"{s}-{d}".replace("torch.", "") for s, d in PAIRS])
def test_merge_is_the_exact_result_rounded_once(src, dst, shape, inflate, monkeypatch) -> None:
    monkeypatch.setattr(exact, "SAFETY", exact.SAFETY * inflate)
    base, terms = _case(shape, src, seed=3)
    expected = _exact(base, terms, dst)
    out = torch.empty(base.shape, dtype=dst)
    assert exact.merge(base, terms, out, mathops.row_blocks(*base.shape, 3 * base.shape[1]))
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    # negative control: float32 arithmetic as PEFT does it is not correctly rounded everywhere
    if dst == torch.float32 and shape == "two":
        peft = base.float() + sum((t.rows @ t.cols) * t.scale for t in terms)
        assert not torch.equal(peft, expected)


def test_midpoints_and_ties_round_to_even() -> None:
    """bfloat16 output where float32 lands on a midpoint: 1 + 2^-8 + 2^-30 rounds up, not to even."""
    x = torch.tensor([1 + 2.0**-8 + 2.0**-30, 1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8 + 2.0**-30)],
                     dtype=torch.float64)
    assert exact.correct_round(x, torch.bfloat16).tolist() == [1 + 2.0**-7, 1.0, 1 + 2.0**-6, -(1 + 2.0**-7)]
    assert x.to(torch.float32).to(torch.bfloat16)[0] == 1.0  # control: the double rounding a cast does
    base = torch.ones(1, 2, dtype=torch.float32)  # the same through merge: W = 1, delta = 2^-8 + 2^-30
    t = exact.term(torch.tensor([[1.0]]), torch.tensor([[2.0**-8 + 2.0**-30, 2.0**-8]]), 1.0)
    out = torch.empty(1, 2, dtype=torch.bfloat16)
    assert exact.merge(base, [t], out)
    assert out.tolist() == [[1 + 2.0**-7, 1.0]]


@pytest.mark.parametrize("q,dtype,expected", [
    (Fraction(1), torch.float32, 1.0),
    (Fraction(1, 3), torch.float32, float(torch.tensor(1 / 3, dtype=torch.float32))),
    (Fraction(2**-150), torch.float32, 0.0),  # half the smallest subnormal: ties to even (zero)
    (Fraction(3, 2**150), torch.float32, 2.0**-148),  # 1.5 subnormal steps: to 2
    (Fraction(65520), torch.float16, float("inf")),  # the float16 overflow threshold
    (Fraction(65519), torch.float16, 65504.0),
    (Fraction(-257), torch.bfloat16, -256.0),  # 257 is a bfloat16 midpoint: to even
])
def test_round_fraction(q: Fraction, dtype: torch.dtype, expected: float) -> None:
    assert exact.round_fraction(q, dtype) == expected


def test_non_finite_results_are_reported() -> None:
    base = torch.zeros(4, 4)
    base[2, 1] = float("nan")
    t = exact.term(torch.ones(4, 1), torch.ones(1, 4), 1.0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert not exact.merge(base, [t], torch.empty(4, 4, dtype=dtype))
    big = exact.term(torch.ones(4, 1), torch.full((1, 4), 7e4), 1.0)
    assert not exact.merge(torch.zeros(4, 4), [big], torch.empty(4, 4, dtype=torch.float16))
    assert exact.merge(torch.zeros(4, 4), [big], torch.empty(4, 4, dtype=torch.bfloat16))  # control
