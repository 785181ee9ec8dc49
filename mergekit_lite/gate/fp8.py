"""Gate check 2 for an FP8 release (`dtype: float8_e4m3fn`): each re-quantized weight, dequantized
here, against W + delta, every element; and each block's scale recomputed from its own values.

The release stores, per block of bo x bi values, e4m3 codes q and a float32 `weight_scale_inv` inv.
The gate dequantizes them itself, in float64 (q inv is exact there: 4 + 24 significant bits), and
compares every element with v = W + delta computed in float64 by expectation.Expectation from the
base and the adapter factors (not by the merge's code, whose bytes this checks).

The bound. A correct quantizer (transformers' FineGrainedFP8 arithmetic, merge/fp8.py) rounds v to
float32 (m = v (1 + d0)), multiplies by the block's scale s = fp32(448 / amax) (y = m s (1 + d1)),
rounds y to the nearest e4m3 value q, and stores inv = fp32(1 / s) (s inv = 1 + d2); |d_i| <= 2^-24.
Then q inv - v = (q - y) inv + (y inv - v), and y inv = v (1 + d0)(1 + d1)(1 + d2), so

    |q inv - v| <= ulp8(y) inv / 2 + 4 * 2^-24 |v| + e,

ulp8(y) being e4m3's spacing at |y| (2^(floor(log2 |y|) - 3) from the smallest normal 2^-6 up,
2^-9 below it): half an e4m3 ulp at the block's scale, plus the float32 steps, plus e, the float64
error of v (elementwise.py). y is taken as |v| / inv, raised by 2^-20 relative so that a y just
below a power of two gets the larger spacing. A missing or doubled delta, a wrong scale or a code
off by one step fails it wherever the error exceeds half a step.

The scales. In a block quantized from its own values the largest |value| maps to 448 exactly
(y = amax s is within 2^-23 of 448, and 448 is e4m3's largest value): every non-zero block's largest
|code| is 448, and an all-zero block has inv = 1. A scale kept from the base, or computed from
other values, fails that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.gate.expectation import Expectation, Getter
from mergekit_lite.io.format import read_header
from mergekit_lite.io.reader import read_entry
from mergekit_lite.plan.plan import PlannedTensor

E4M3_MAX = 448.0
E4M3_MIN_EXPONENT = -6  # the smallest normal is 2^-6
E4M3_MANTISSA = 3
F32_STEPS = 4 * 2.0**-24  # the quantizer's three float32 roundings, relative to |v|, rounded up
Y_RAISE = 1 + 2.0**-20


@dataclass
class Fp8Worst:
    """The FP8 tensors' worst element (its distance over its bound) and blocks whose scale is not their own."""

    share: float = 0.0  # the largest |q inv - v| / bound
    name: str = ""
    index: tuple[int, int] = (0, 0)
    written: float = 0.0
    expected: float = 0.0
    beyond: int = 0
    elements: int = 0
    tensors: int = 0
    failing: list[str] = field(default_factory=list)
    bad_blocks: list[str] = field(default_factory=list)  # `tensor[block row, block col]`
    blocks: int = 0


def dequantize(codes: torch.Tensor, inv: torch.Tensor, block: tuple[int, int], r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 (one row of blocks) of q inv, in float64."""
    cols = codes.shape[1]
    scale = inv[r0 // block[0]].to(torch.float64).repeat_interleave(block[1])[:cols]
    return codes[r0:r1].to(torch.float64) * scale


def e4m3_spacing(y: torch.Tensor) -> torch.Tensor:
    """e4m3's spacing at |y| (float64): 2^(max(floor(log2 |y|), -6) - 3)."""
    _, exponent = torch.frexp(y.abs())
    exponent = torch.where(y == 0, torch.full_like(exponent, E4M3_MIN_EXPONENT), exponent - 1)
    return torch.ldexp(torch.ones_like(y), exponent.clamp_min(E4M3_MIN_EXPONENT) - E4M3_MANTISSA)


def check_fp8(
    t: PlannedTensor, codes: torch.Tensor, inv: torch.Tensor, w0: torch.Tensor, get: Getter, worst: Fp8Worst
) -> None:
    """Every element of the FP8 tensor `t` (codes and its weight_scale_inv, as released) against W + delta
    from `w0` and t's ops, one row of blocks at a time; and its blocks' largest codes."""
    block = (int(t.fp8_block[0]), int(t.fp8_block[1]))
    expect = Expectation(t, w0, get)
    rows, cols = codes.shape
    worst.tensors += 1
    for r0 in range(0, rows, block[0]):
        r1 = min(r0 + block[0], rows)
        v, scale = expect.rows(r0, r1, torch.empty((r1 - r0, cols), dtype=torch.float64))
        written = dequantize(codes, inv, block, r0, r1)
        step = inv[r0 // block[0]].to(torch.float64).repeat_interleave(block[1])[:cols]
        bound = e4m3_spacing(v.abs() / step * Y_RAISE) * step / 2 + F32_STEPS * v.abs() + expect.error(v, scale)
        diff = (written - v).abs()
        beyond = ~(diff <= bound)  # NaN counts as beyond
        worst.elements += diff.numel()
        worst.beyond += int(beyond.sum())
        if bool(beyond.any()) and t.name not in worst.failing:
            worst.failing.append(t.name)
        share = torch.where(diff.isnan(), torch.full_like(diff, float("inf")), diff / bound)
        i = int(share.argmax())
        if float(share.view(-1)[i]) > worst.share:
            r, c = divmod(i, cols)
            worst.share, worst.name, worst.index = float(share.view(-1)[i]), t.name, (r0 + r, c)
            worst.written, worst.expected = float(written[r, c]), float(v[r, c])
        _check_scales(t.name, codes[r0:r1], inv[r0 // block[0]], block[1], r0 // block[0], worst)


def _check_scales(name: str, codes: torch.Tensor, inv: torch.Tensor, width: int, row: int, worst: Fp8Worst) -> None:
    """A row of blocks: each block's largest |code| is 448, or the block is zero with inv = 1."""
    cols = codes.shape[1]
    for j in range(inv.shape[0]):
        largest = float(codes[:, j * width : min((j + 1) * width, cols)].to(torch.float32).abs().max())
        worst.blocks += 1
        if not (largest == E4M3_MAX or (largest == 0.0 and float(inv[j]) == 1.0)):
            worst.bad_blocks.append(f"{name}[{row}, {j}]")


def dense_values(codes: torch.Tensor, inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """An FP8 weight as transformers' Fp8Dequantize gives it (q inv in float32, one rounding, then
    `dtype`), for any grid, partial edge blocks included, which transformers refuses; the gate's own code."""
    out = torch.empty(codes.shape, dtype=dtype)
    for r0 in range(0, codes.shape[0], block[0]):
        r1 = min(r0 + block[0], codes.shape[0])
        out[r0:r1] = dequantize(codes, inv, block, r0, r1).to(torch.float32).to(dtype)
    return out


def ragged(shapes: dict[str, tuple[int, ...]], blocks: dict[str, tuple[int, int]]) -> bool:
    """Whether some FP8 weight's shape is not a multiple of its block (transformers cannot dequantize it)."""
    return any(shapes[n][0] % b[0] or shapes[n][1] % b[1] for n, b in blocks.items() if n in shapes)


def load_release(candidate: Path, loader: Any, dtype: torch.dtype, blocks: dict[str, tuple[int, int]]) -> Any:
    """The FP8 release as a dense model of `loader`'s class in `dtype`, its FP8 weights dequantized by
    dense_values: for a release transformers cannot dequantize (partial blocks)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(candidate)
    config.quantization_config = None
    del config.quantization_config
    model = loader.from_config(config, dtype=dtype) if hasattr(loader, "from_config") else loader._from_config(config)
    state = {}
    for path in sorted(candidate.glob("*.safetensors")):
        for name, entry in read_header(path).tensors.items():
            if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in blocks:
                continue
            value = read_entry(entry)
            if name in blocks:
                scale = read_header(path).tensors.get(name + "_scale_inv")
                inv = read_entry(scale) if scale is not None else _scale_elsewhere(candidate, name)
                value = dense_values(value, inv, blocks[name], dtype)
            state[name] = value.to(dtype) if value.is_floating_point() else value
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"the FP8 release does not fit its model class: {sorted(missing)} {sorted(unexpected)}")
    model.tie_weights()
    return model.eval()


def _scale_elsewhere(candidate: Path, name: str) -> torch.Tensor:
    for path in sorted(candidate.glob("*.safetensors")):
        entry = read_header(path).tensors.get(name + "_scale_inv")
        if entry is not None:
            return read_entry(entry)
    raise RuntimeError(f"the FP8 release has no `{name}_scale_inv`")
