"""Fine-grained FP8 quantization of a merged weight, with transformers' FineGrainedFP8 arithmetic.

transformers' `Fp8Quantize._quantize_one` (integrations/finegrained_fp8.py), on a float32 weight in
blocks of bo x bi: per block, amax = max |w|; scale = 448 / amax in float32 (1 where amax is 0);
`weight_scale_inv` = 1 / scale in float32; codes = float8_e4m3fn(clamp(w * scale, -448, 448)), the
product rounded to float32 first. The same torch operations in the same order here, so the bytes are
those transformers' quantizer makes of the same float32 weight (tests/test_fp8_release.py).

transformers quantizes only weights whose dimensions are multiples of the block. A partial edge
block (DeepSeek-V3's ceil grid: `weight_scale_inv` [ceil(rows / bo), ceil(cols / bi)]) takes its
amax over the values it has, which is what transformers' arithmetic gives for the weight padded with
zeros to the grid, and is quantized as a full one.

Memory: one row of blocks at a time, in float32 (bo x cols padded to the grid), beside the codes.
"""

from __future__ import annotations

import torch

from mergekit_lite.plan.fp8 import grid

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0, a Python float as transformers' _FP8_MAX


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn [rows, cols], weight_scale_inv float32 grid) of a float32 weight."""
    rows, cols = w.shape
    bo, bi = block
    grid_rows, grid_cols = grid(w.shape, block)
    codes = torch.empty((rows, cols), dtype=FP8, device=w.device)
    inv = torch.empty((grid_rows, grid_cols), dtype=torch.float32, device=w.device)
    padded = torch.zeros((bo, grid_cols * bi), dtype=torch.float32, device=w.device)
    for i in range(grid_rows):
        r0, r1 = i * bo, min((i + 1) * bo, rows)
        padded.zero_()
        padded[: r1 - r0, :cols] = w[r0:r1]
        tiles = padded.view(bo, grid_cols, bi)
        max_abs = tiles.abs().amax(dim=(0, 2))
        safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
        scales = FP8_MAX / safe
        scales = torch.where(max_abs > 0, scales, torch.ones_like(scales))
        inv[i] = (1.0 / scales).to(torch.float32)
        scaled = tiles * scales.view(1, grid_cols, 1)
        quantized = torch.clamp(scaled, min=-FP8_MAX, max=FP8_MAX).to(FP8)
        codes[r0:r1] = quantized.view(bo, grid_cols * bi)[: r1 - r0, :cols]
    return codes, inv
