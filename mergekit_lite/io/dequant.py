"""Quantized tensors made dense again, exactly as their quantizer does it (pure functions on tensors).

bitsandbytes 4-bit (nf4, fp4): two 4-bit codes per byte, the first in the high nibble; each value is
code[nibble] * absmax[block] in float32 over blocks of `blocksize` values of the flattened tensor,
rounded once to the dtype the quant_state records. With double quantization the absmax are
themselves 8-bit codes: absmax = nested_code[byte] * nested_absmax[block] + offset, in float32.
bitsandbytes' kernels use their own nf4 / fp4 tables, not the stored quant_map; the tables are
written out here (NF4, FP4) and sources/quantized.py refuses a checkpoint whose quant_map has
other values.

bitsandbytes 8-bit (LLM.int8): weight int8 [out, in], SCB float32 [out]: weight * SCB / 127, in
float32, as bitsandbytes' int8_vectorwise_dequant computes it, then rounded to the entry's dtype
(the model's, as transformers' `model.dequantize()` does).

Fine-grained FP8 (DeepSeek-V3, Qwen3-FP8; transformers' FineGrainedFP8): weight float8_e4m3fn
[out, in], weight_scale_inv float32 [ceil(out / bo), ceil(in / bi)] for blocks of bo x bi: each
value is float32(weight) * scale of its block, in float32, rounded to the entry's dtype, as
transformers' Fp8Dequantize computes it.

MXFP4 (gpt-oss's experts): `X_blocks` uint8 [E, R, G, 16] holds two e2m1 codes a byte (the first
in the low nibble) for groups of 32 values, `X_scales` uint8 [E, R, G] their exponents (bias 127):
value = e2m1[code] * 2^(scale - 127) in the entry's dtype, laid out [E, G * 32, R], as
transformers' convert_moe_packed_tensors computes it.

QLoRA's weights on a 16-bit base (`qlora4`, the manifest's `base: {dequantize: nf4}`): the weight
quantized by bitsandbytes' quantize_4bit as Params4bit does (blocksize 64, double quant), then
dequantized as above. Only this one imports bitsandbytes (the quantizer itself is the reference).

Nothing else here imports bitsandbytes; tests/test_quantized.py checks every function bit for bit
against it.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable

import torch

from mergekit_lite.io.format import DTYPES, Quantized, TensorEntry

METHODS = ("bnb4", "bnb8", "fp8", "mxfp4", "qlora4")
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # MXFP4's values
CHUNK = 2**20  # values dequantized at a time: the int32 codes and float32 values of one chunk

# bitsandbytes.functional.get_4bit_type("nf4") and ("fp4"), as float32 bit patterns; fp4's code 8
# is -0.0, as bitsandbytes' CPU and CUDA kernels decode it (sign bit set, zero magnitude), where
# get_4bit_type and its pure-torch fallback say +0.0 (the same value, another bit pattern)
NF4 = (
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
)  # fmt: skip
FP4 = (
    0x00000000, 0x3BAAAAAB, 0x3F2AAAAB, 0x3F800000, 0x3EAAAAAB, 0x3F000000, 0x3E2AAAAB, 0x3E800000,
    0x80000000, 0xBBAAAAAB, 0xBF2AAAAB, 0xBF800000, 0xBEAAAAAB, 0xBF000000, 0xBE2AAAAB, 0xBE800000,
)  # fmt: skip
CODES = {"nf4": NF4, "fp4": FP4}
INT8_SCALE = 7.874015718698502e-3  # bitsandbytes' 1/127


def code_table(quant_type: str) -> torch.Tensor:
    """bitsandbytes' 16 values of `quant_type` (nf4 or fp4), float32."""
    return torch.tensor(struct.unpack("<16f", struct.pack("<16I", *CODES[quant_type])), dtype=torch.float32)


def blockwise(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int) -> torch.Tensor:
    """table[codes] * absmax[block] in float32, blocks of `blocksize` consecutive values (the last may be short)."""
    values = table[codes.reshape(-1).to(torch.int32)]
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[full // blocksize]
    return out


def nested_absmax(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int, offset: float):
    """Double quantization's absmax: nested_code[byte] * nested_absmax[block] + offset, in float32."""
    out = blockwise(codes, absmax, table, blocksize)
    out += torch.tensor(offset, dtype=torch.float32)
    return out


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, shape: tuple[int, ...], dtype
) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit: `packed` holds two codes a byte (high nibble first), `absmax`
    one float32 scale per block of `blocksize` values; the result has `shape` and `dtype`.

    Taken CHUNK values at a time (a multiple of the block size), so that the int32 codes and
    float32 products held at once stay small next to the output.
    """
    data = packed.reshape(-1).view(torch.uint8)
    n = math.prod(shape)
    table = code_table(quant_type)
    out = torch.empty(n, dtype=dtype)
    step = max(CHUNK // blocksize, 1) * blocksize
    for start in range(0, n, step):
        stop = min(start + step, n)
        byte = data[start // 2 : (stop + 1) // 2]
        codes = torch.stack((byte >> 4, byte & 0xF), dim=1).reshape(-1)[: stop - start]
        scales = absmax[start // blocksize : -(-stop // blocksize)]
        out[start:stop] = blockwise(codes, scales, table, blocksize)
    return out.view(shape)


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' int8_vectorwise_dequant: weight * SCB[row] / 127, float32."""
    return weight * scb.view(-1, 1) * INT8_SCALE


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """float32(weight) * scale_inv of its block (`block` = rows, columns), rounded to `dtype`; one
    row of blocks at a time, so that the float32 copy held at once is one block row."""
    rows, cols = weight.shape
    bo, bi = block
    out = torch.empty((rows, cols), dtype=dtype)
    for i, start in enumerate(range(0, rows, bo)):
        scales = scale_inv[i].float().repeat_interleave(bi)[:cols]
        out[start : start + bo] = (weight[start : start + bo].float() * scales).to(dtype)
    return out


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """MXFP4 blocks [E, R, G, 16] and scales [E, R, G] as values [E, G * 32, R] in `dtype`, one expert at a time."""
    experts, rows, groups, width = blocks.shape
    lut = torch.tensor(E2M1, dtype=dtype)
    out = torch.empty((experts, groups * width * 2, rows), dtype=dtype)
    for e in range(experts):
        packed = blocks[e].reshape(rows * groups, width)
        values = torch.empty((rows * groups, width * 2), dtype=dtype)
        values[:, 0::2] = lut[(packed & 0x0F).to(torch.int)]
        values[:, 1::2] = lut[(packed >> 4).to(torch.int)]
        torch.ldexp(values, scales[e].reshape(-1, 1).to(torch.int32) - 127, out=values)
        out[e] = values.view(rows, groups * width * 2).transpose(0, 1)
    return out


QLORA_BLOCKSIZE = 64  # transformers' BitsAndBytesConfig gives bitsandbytes no other


def simulate_4bit(weight: torch.Tensor, quant_type: str) -> torch.Tensor:
    """`weight` as QLoRA trains against it: bitsandbytes' quantize_4bit (double quant), dequantized."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its import warns about a CPU kernel
    import bitsandbytes.functional as bnb

    packed, state = bnb.quantize_4bit(
        weight.contiguous(), blocksize=QLORA_BLOCKSIZE, compress_statistics=True, quant_type=quant_type
    )
    s2 = state.state2
    absmax = nested_absmax(state.absmax, s2.absmax, s2.code, s2.blocksize, float(state.offset))
    return dequantize_4bit(packed, absmax, quant_type, QLORA_BLOCKSIZE, tuple(weight.shape), weight.dtype)


def dequantize(entry: TensorEntry, read: Callable[[TensorEntry], torch.Tensor]) -> torch.Tensor:
    """The values of a quantized tensor, from its parts (read with `read`), in entry.dtype and entry.shape."""
    q = entry.quant
    assert q is not None
    dtype = DTYPES[entry.dtype]
    if q.method == "bnb4":
        return dequantize_4bit(
            read(q.part("weight")),
            _absmax(q, read),
            str(q.param("quant_type")),
            int(q.param("blocksize")),
            entry.shape,
            dtype,
        )
    if q.method == "bnb8":
        return dequantize_int8(read(q.part("weight")), read(q.part("SCB"))).to(dtype)
    if q.method == "fp8":
        block = (int(q.param("block_rows")), int(q.param("block_cols")))
        return dequantize_fp8_blocks(read(q.part("weight")), read(q.part("weight_scale_inv")), block, dtype)
    if q.method == "qlora4":
        return simulate_4bit(read(q.part("weight")), str(q.param("quant_type")))
    if q.method == "mxfp4":
        return dequantize_mxfp4(read(q.part("blocks")), read(q.part("scales")), dtype)
    raise ValueError(f"internal error: unknown quantization method {q.method!r}")


def _absmax(q: Quantized, read: Callable[[TensorEntry], torch.Tensor]) -> torch.Tensor:
    absmax = read(q.part("absmax"))
    if "nested_absmax" not in dict(q.parts):
        return absmax.float()
    return nested_absmax(
        absmax,
        read(q.part("nested_absmax")).float(),
        read(q.part("nested_quant_map")).float(),
        int(q.param("nested_blocksize")),
        float(q.param("nested_offset")),
    )
