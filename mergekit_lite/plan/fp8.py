"""`dtype: float8_e4m3fn`: which output tensors are written as fine-grained FP8, and the release's
`quantization_config` (transformers' FineGrainedFP8 layout, as DeepSeek-V3 and Qwen3-FP8 publish it).

A fine-grained FP8 base (`quant_method: fp8`, float32 `weight_scale_inv` block scales) keeps its
layout: every tensor it stores as FP8 is written as FP8 with its block size, its scales
recomputed from the merged weight (merge/fp8.py) where an adapter changes it and copied byte for
byte where none does; every other float tensor is written in bfloat16; config.json keeps the base's
`quantization_config` as it is. Each FP8 weight's `weight_scale_inv` (float32) is planned right after
it, in the same shard.

A dense base gets what transformers' own FP8 quantizer (`FineGrainedFP8Config()`, 128x128 blocks, or
the manifest's `fp8: {weight_block_size, modules_to_not_convert}`) makes of it: the Linear weights it
converts (sources/fp8_targets.py: not lm_head, embeddings, norms or its modules_to_not_convert) in
FP8 where both dimensions are multiples of the block, the scales
computed from the merged weight; a Linear whose dimensions are not stays dense (bfloat16), as
transformers' quantizer leaves it, and is named in the written `modules_to_not_convert` (with
transformers' own defaults, which a written list replaces on load), so that transformers loads it
as a plain Linear.

Bases stored in another quantized format (bitsandbytes, MXFP4) and ue8m0 or bfloat16 scales are
refused: their release is written dense instead (`dtype: bfloat16`).
"""

from __future__ import annotations

from typing import Any

from mergekit_lite.errors import PlanError
from mergekit_lite.io.format import FLOAT_DTYPES
from mergekit_lite.manifest.sections import Fp8Spec
from mergekit_lite.plan.plan import PlannedTensor
from mergekit_lite.sources.checkpoint import Checkpoint
from mergekit_lite.sources.fp8_targets import fp8_targets

FP8_DTYPE = "float8_e4m3fn"  # the manifest's name
FP8 = "F8_E4M3"
DENSE_DTYPE = "bfloat16"  # the other float tensors of an FP8 release, as FP8 checkpoints ship them


def grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The block-scale grid of a [rows, cols] weight: ceil(rows / bo) x ceil(cols / bi)."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def plan_fp8(
    ckpt: Checkpoint, tensors: list[PlannedTensor], spec: Fp8Spec | None = None
) -> tuple[list[PlannedTensor], dict[str, Any]]:
    """The planned tensors with the FP8 ones (and their scales) in place; the release's quantization_config.
    `spec` is the manifest's `fp8` section (a dense base's options)."""
    methods = sorted({t.quantized for t in tensors if t.quantized})
    if methods == ["fp8"]:
        if spec is not None:
            raise PlanError(
                f"`fp8` sets how a dense base is quantized; base `{ckpt.path}` is stored as FP8 already and its "
                "release keeps its layout (its weight_block_size and dense modules): drop `fp8`"
            )
        return _from_fp8_base(ckpt, tensors), dict(ckpt.config["quantization_config"])
    if methods:
        raise PlanError(
            f"`dtype: {FP8_DTYPE}` writes fine-grained FP8 from an FP8 or a dense base, but base `{ckpt.path}` is "
            f"{ckpt.quantization}; use `dtype: bfloat16` (or auto) for a dense release"
        )
    return _from_dense_base(ckpt, tensors, spec or Fp8Spec())


def _from_dense_base(
    ckpt: Checkpoint, tensors: list[PlannedTensor], spec: Fp8Spec
) -> tuple[list[PlannedTensor], dict[str, Any]]:
    """The Linear weights transformers' FP8 quantizer converts (sources/fp8_targets.py) in blocks of
    `spec.weight_block_size` where both dimensions are multiples of it; the others stay dense, named in
    modules_to_not_convert."""
    targets = fp8_targets(ckpt, spec.modules_to_not_convert)
    bo, bi = spec.weight_block_size
    block = (bo, bi)
    dense = set(targets.not_converted) | set(targets.kept_dense)
    out: list[PlannedTensor] = []
    for t in tensors:
        out.append(t)
        module = targets.linears.get(t.name) if t.name == t.source else None
        if module is None or t.src_dtype not in FLOAT_DTYPES or len(t.shape) != 2:
            continue
        if t.shape[0] % bo or t.shape[1] % bi:  # transformers' quantizer leaves these as they are
            dense.add(module)
            continue
        t.dtype, t.fp8_block = FP8, block
        out.append(PlannedTensor(t.name + "_scale_inv", t.source, "F32", "F32", grid(t.shape, block), scale_of=t.name))
    if not any(t.fp8_block for t in out):
        raise PlanError(
            f"`dtype: {FP8_DTYPE}`: no Linear weight of base `{ckpt.path}` that transformers' FP8 quantizer converts has "
            f"both dimensions multiples of {bo}x{bi}, so nothing would be FP8; use `dtype: bfloat16`"
        )
    config = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [bo, bi],
        "modules_to_not_convert": sorted(dense),
    }
    return out, config


def _from_fp8_base(ckpt: Checkpoint, tensors: list[PlannedTensor]) -> list[PlannedTensor]:
    qc = ckpt.config["quantization_config"]
    if qc.get("scale_fmt", "float") != "float":
        raise PlanError(
            f"`dtype: {FP8_DTYPE}`: base `{ckpt.path}` has `scale_fmt: {qc.get('scale_fmt')}` (power-of-two "
            "scales), which mergekit-lite does not recompute; use `dtype: bfloat16` for a dense release"
        )
    out: list[PlannedTensor] = []
    for t in tensors:
        out.append(t)
        if t.quantized != "fp8":
            continue
        entry = ckpt.tensors[t.source]
        assert entry.quant is not None
        scale = entry.quant.part("weight_scale_inv")
        if scale.dtype != "F32":
            raise PlanError(
                f"`dtype: {FP8_DTYPE}`: base `{ckpt.path}` stores `{scale.name}` as {scale.dtype}; only float32 "
                "block scales are recomputed (use `dtype: bfloat16` for a dense release)"
            )
        block = (int(entry.quant.param("block_rows")), int(entry.quant.param("block_cols")))
        assert tuple(scale.shape) == grid(t.shape, block)  # sources/quantized.py checked the grid
        t.dtype, t.fp8_block = FP8, block
        t.part = "" if t.ops else "weight"
        out.append(
            PlannedTensor(
                t.name + "_scale_inv",
                t.source,
                "F32",
                "F32",
                tuple(scale.shape),
                scale_of=t.name,
                part="" if t.ops else "weight_scale_inv",
            )
        )
    return out
