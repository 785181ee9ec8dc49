"""The elementwise check's two evaluations (gate/elementwise.py): float32 for 16-bit outputs without
DoRA, float64 otherwise; the float32 values within their stated bound; and its sensitivity on small
elements, which the float32 path measures against float64 values of their own.

Each case is one tensor checked by ElementCheck directly: W' is W + s B A (computed in float64,
rounded once correctly to the output dtype), then mutated for the negative controls.
"""

from __future__ import annotations

import pytest
import torch

from mergekit_lite.gate.elementwise import ElementCheck, Worst
from mergekit_lite.gate.expectation import U32, Expectation
from mergekit_lite.plan.plan import Op, PlannedTensor

NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
ROWS, COLS, RANK, SCALE = 2048, 512, 8, 1 / 3  # 2 float32 blocks of the check; 1/3: s B rounds in float32
SMALL = (300, 17)


def correctly_rounded(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 v rounded once to `dtype`: round to odd in float32 (truncate, set the last bit when
    inexact), then to nearest; torch's own conversion goes through float32 rounding twice."""
    if dtype == torch.float32:
        return v.to(torch.float32)
    f = v.to(torch.float32)
    bits = f.view(torch.int32).clone()
    bits -= (f.to(torch.float64).abs() > v.abs()).to(torch.int32)  # one step towards zero: truncated
    bits |= (bits.view(torch.float32).to(torch.float64) != v).to(torch.int32)  # inexact: odd
    return bits.view(torch.float32).to(dtype)


def case(dtype: torch.dtype, *, seed: int = 0, dora: bool = False, spike: float = 0.0, small: float = 0.0):
    """(tensor plan, W0, getter, W' correctly rounded, v in float64) for one LoRA'd [ROWS, COLS] weight.
    `spike`: column 0 of A that large, so that row spreads S_i are large against most elements. `small`:
    W[SMALL] and row SMALL[0] of B that share of their largest, so that W'[SMALL] is about that small."""
    g = torch.Generator().manual_seed(seed)
    stored = dtype if dtype != torch.float32 else torch.bfloat16
    w0 = (torch.randn(ROWS, COLS, generator=g) * 0.02).to(dtype)
    a = (torch.randn(RANK, COLS, generator=g) * 0.1).to(stored)
    b = (torch.randn(ROWS, RANK, generator=g) * 0.1).to(stored)
    if spike:
        a[:, 0] = spike
    if small:
        w0[SMALL] = small * float(w0.abs().max())
        b[SMALL[0]] *= small
    factors = {"A": a, "B": b, "m": (torch.rand(ROWS, generator=g) + 0.5).to(stored)}
    v = w0.to(torch.float64) + SCALE * (b.to(torch.float64) @ a.to(torch.float64))
    if dora:
        v = factors["m"].to(torch.float64).reshape(-1, 1) / v.norm(dim=1, keepdim=True) * v
    op = Op(kind="dora" if dora else "delta", adapter=0, keys=("A", "B", "m"), scale=SCALE, layout="linear")
    plan = PlannedTensor("w", "w", NAMES[dtype], NAMES[dtype], (ROWS, COLS), ops=[op])
    return plan, w0, lambda o, i: factors[o.keys[i]], correctly_rounded(v, dtype), v


def check(plan, w0, get, merged, element_ulps: float = 1.0) -> Worst:
    with ElementCheck(2, element_ulps) as elements:
        elements.check(plan, merged, w0, get)
    return elements.total


def flip(merged: torch.Tensor, index: tuple[int, int], bit: int) -> torch.Tensor:
    bad = merged.clone()
    integer = torch.int16 if bad.element_size() == 2 else torch.int32
    bad.view(integer)[index] ^= 1 << bit
    return bad


@pytest.mark.parametrize(
    ("dtype", "dora", "single"),
    [(torch.bfloat16, False, 1), (torch.float16, False, 1), (torch.float32, False, 0), (torch.bfloat16, True, 0)],
    ids=["bf16-float32-path", "fp16-float32-path", "fp32-float64-path", "bf16-dora-float64-path"],
)
def test_the_path_taken_and_a_correct_merge_passes(dtype: torch.dtype, dora: bool, single: int) -> None:
    """16-bit outputs are evaluated in float32, float32 outputs and DoRA in float64; either way the
    correctly rounded merge is that everywhere, and a flipped exponent bit fails (the control)."""
    plan, w0, get, merged, _ = case(dtype, dora=dora)
    worst = check(plan, w0, get, merged)
    assert (worst.single, worst.elements, worst.beyond, worst.not_rounded, worst.ulps) == (single, ROWS * COLS, 0, 0, 0)
    exponent = {torch.bfloat16: 13, torch.float16: 13, torch.float32: 29}[dtype]
    bad = check(plan, w0, get, flip(merged, (700, 9), exponent))
    assert bad.beyond == 1 and bad.index == (700, 9) and bad.failing == ["w"], bad


@pytest.mark.parametrize("setting", ["precision", "stricter-bound"])
def test_float64_where_float32_may_not_stand_in(setting: str) -> None:
    """A lowered float32 matmul precision (TF32 or bfloat16 passes) or element_ulps < 1 in the manifest:
    float64. The control: the same tensor with neither takes the float32 path."""
    plan, w0, get, merged, _ = case(torch.bfloat16)
    assert check(plan, w0, get, merged).single == 1
    before = torch.get_float32_matmul_precision()
    try:
        if setting == "precision":
            torch.set_float32_matmul_precision("medium")
        worst = check(plan, w0, get, merged, element_ulps=0.5 if setting == "stricter-bound" else 1.0)
    finally:
        torch.set_float32_matmul_precision(before)
    assert (worst.single, worst.beyond, worst.not_rounded) == (0, 0, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_values_within_their_bound(dtype: torch.dtype) -> None:
    """|v32 - v| <= 2 N u (|W| + S_i) for every element (the bound elementwise.py's proof starts from),
    and the float32 error is real: it exceeds float64's bound somewhere (the control)."""
    plan, w0, get, _, v = case(dtype, seed=3)
    expect = Expectation(plan, w0, get)
    assert expect.single(dtype, 1.0)
    v32 = expect.rows32(0, ROWS, torch.empty(ROWS, COLS)).to(torch.float64)
    bound = 2 * expect.terms32 * U32 * (w0.to(torch.float64).abs() + expect.spread_rows.reshape(-1, 1))
    error = (v32 - v).abs()
    assert bool((error <= bound).all()), float((error / bound).max())
    assert float(error.max()) > expect.absolute
    exact = expect.at(torch.arange(ROWS).repeat_interleave(COLS), torch.arange(COLS).repeat(ROWS))
    assert float((exact - v.reshape(-1)).abs().max()) <= expect.absolute  # the float64 values, element by element


@pytest.mark.parametrize("share", [1e-3, 1e-4, 1e-5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_element_with_a_flipped_mantissa_bit_fails_on_the_float32_path(dtype: torch.dtype, share: float) -> None:
    """An element `share` of the tensor's largest, mantissa bit 2 flipped (4 ulps): beyond the bound, as
    one float32 error bound for the whole tensor (2 N u (max |W| + max S_i)) would not show below about
    3e-4. The control: the merge as written passes, on the float32 path."""
    plan, w0, get, merged, _ = case(dtype, seed=5, small=share)
    small, largest = float(merged[SMALL]), float(merged.abs().max())
    assert 0.5 * share < abs(small) / largest < 2 * share
    clean = check(plan, w0, get, merged)
    assert (clean.single, clean.beyond, clean.not_rounded) == (1, 0, 0), clean
    bad = check(plan, w0, get, flip(merged, SMALL, 2))
    assert (bad.single, bad.beyond, bad.index, bad.failing) == (1, 1, SMALL, ["w"]), bad
    assert 3.5 < bad.ulps < 4.5
    expect = Expectation(plan, w0, get)
    per_tensor = 2 * expect.terms32 * U32 * (float(w0.abs().max()) + float(expect.spread_rows.max()))
    if share <= 1e-4:  # what a per-tensor bound would have hidden
        assert abs(float(flip(merged, SMALL, 2)[SMALL]) - small) < per_tensor


def test_rows_of_a_large_spread_pass_and_their_small_elements_are_checked() -> None:
    """A spike in A's column 0 makes every row's spread S_i large against its other elements (where
    condition (ii) of elementwise.py fails, and passing on bits is weaker than float64's bound): the
    correct merge passes, and the lowest-but-one mantissa bit flipped in such an element fails."""
    plan, w0, get, merged, _ = case(torch.bfloat16, seed=7, spike=1000.0)
    worst = check(plan, w0, get, merged)
    assert (worst.single, worst.beyond, worst.not_rounded) == (1, 0, 0), worst
    expect = Expectation(plan, w0, get)
    ulp = 2.0 ** (torch.frexp(merged[11, 40].to(torch.float64).abs())[1] - 8)
    assert float(ulp) < 16 * expect.terms32 * U32 * float(expect.spread_rows[11])  # (ii) fails there
    bad = check(plan, w0, get, flip(merged, (11, 40), 1))
    assert (bad.beyond, bad.index) == (1, (11, 40)), bad


def test_a_merge_rounded_otherwise_passes_and_is_counted() -> None:
    """W' rounded through float32 by another convention (PEFT's in the output dtype: the delta rounded,
    then the sum) differs from v's rounding in many elements, so blocks are redone in float64 whole: it
    passes, its not-correctly-rounded elements are counted. The control: the delta applied twice fails."""
    plan, w0, get, _, v = case(torch.bfloat16, seed=9)
    delta = (SCALE * (get(plan.ops[0], 1).float() @ get(plan.ops[0], 0).float())).to(torch.bfloat16)
    peft = (w0.float() + delta.float()).to(torch.bfloat16)
    worst = check(plan, w0, get, peft)
    assert (worst.single, worst.beyond) == (1, 0) and worst.not_rounded > 0 and 0.5 < worst.ulps <= 1.5, worst
    twice = (w0.float() + 2 * delta.float()).to(torch.bfloat16)
    assert check(plan, w0, get, twice).beyond > ROWS * COLS // 10
