"""A quantized base checkpoint, seen as the dense one it stands for.

config.json's `quantization_config` says how the base was quantized. For bitsandbytes (4-bit nf4
/ fp4, with or without double quantization, any block size and quant_storage; 8-bit LLM.int8)
fine-grained FP8 (`quant_method: fp8`, block scales `weight_scale_inv`) and MXFP4 (gpt-oss's
experts, `_blocks` and `_scales`)
each quantized weight's stored parts are gathered into one TensorEntry with `quant` set, whose
dtype and shape are those of the dequantized values (io/dequant.py computes them); the parts
themselves leave the tensor list. Everything the dequantization needs is checked here, from the
headers and the small quant_state tensors (a few hundred bytes each), so that a bad checkpoint
fails before anything is written. Other quantization methods are refused with what to do instead.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import CheckpointError
from mergekit_lite.io.dequant import CODES, code_table
from mergekit_lite.io.format import ITEMSIZE, Quantized, TensorEntry
from mergekit_lite.io.reader import read_entry

QS_PREFIX = ".quant_state.bitsandbytes__"
BNB4_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BNB4_KEYS = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' dequantize_4bit accepts
QS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_QUANT_STATE = 4096  # bytes of JSON; bitsandbytes writes under 200

_DEQUANTIZE_FIRST = (
    "dequantize it to a 16-bit checkpoint first (transformers: load it, then "
    "`model.dequantize()` where supported, and `save_pretrained`), or use the 16-bit model it was made from"
)
REFUSED = {
    "gptq": "GPTQ weights are packed int4 with act-order permutations",
    "awq": "AWQ weights are packed int4 with per-group zero points",
    "hqq": "HQQ weights are stored as its own packed layout",
    "aqlm": "AQLM weights are additive codebooks",
    "eetq": "EETQ weights are an int8 kernel layout",
    "compressed-tensors": "compressed-tensors checkpoints come in many layouts",
    "torchao": "torchao checkpoints hold tensor subclasses",
    "quanto": "quanto checkpoints hold its own packed layout",
    "gguf": "GGUF is llama.cpp's format",
}


def method_of(config: dict[str, Any]) -> str | None:
    """The quantization method config.json names (`quantization_config.quant_method`), or None."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError("config.json's `quantization_config` is not an object")
    method = qc.get("quant_method", "bitsandbytes" if qc.get("load_in_4bit") or qc.get("load_in_8bit") else None)
    return str(method).lower() if method is not None else "unknown"


def dequantized_tensors(path: Path, config: dict[str, Any], tensors: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """The base's tensors with each quantized weight as one dequantizable entry, in file order."""
    method = method_of(config)
    if method is None:
        return tensors
    if method == "bitsandbytes":
        return _bitsandbytes(path, tensors, _model_dtype(config))
    if method == "fp8":
        return _fp8(path, config["quantization_config"], tensors, _model_dtype(config))
    if method == "mxfp4":
        return _mxfp4(path, tensors, _model_dtype(config))
    reason = REFUSED.get(method, "mergekit-lite does not know it")
    raise CheckpointError(
        f"base `{path}` is quantized with `{method}` ({reason}), which mergekit-lite cannot dequantize exactly; "
        f"{_DEQUANTIZE_FIRST}"
    )


def simulated(
    path: Path, tensors: dict[str, TensorEntry], quant_type: str, embeddings: tuple[str | None, str | None]
) -> dict[str, TensorEntry]:
    """The tensors of a 16-bit base with every Linear weight (2-D, not an embedding, as transformers'
    bitsandbytes quantizer picks them) to be read as QLoRA's quantized-then-dequantized weights."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CheckpointError(
            f"`base: {{dequantize: {quant_type}}}` quantizes the base as QLoRA does, with bitsandbytes, which "
            "is not installed: `pip install bitsandbytes`, or drop `dequantize` to merge into the 16-bit weights"
        )
    if any(e.quant is not None for e in tensors.values()):
        raise CheckpointError(
            f"base `{path}` is stored quantized already and is merged into its dequantized weights; "
            "`dequantize` is for a 16-bit base"
        )
    out = {}
    for name, entry in tensors.items():
        linear = len(entry.shape) == 2 and name.endswith(".weight") and name not in embeddings
        if linear and entry.dtype in QS_DTYPES.values():
            quant = Quantized("qlora4", (("weight", entry),), (("quant_type", quant_type),))
            entry = TensorEntry(name, entry.dtype, entry.shape, entry.file, entry.begin, entry.nbytes, quant)
        out[name] = entry
    return out


def describe(tensors: dict[str, TensorEntry]) -> str:
    """How the dequantized tensors were stored, e.g. `bitsandbytes nf4 (double quant)`; "" if none are."""
    kinds = []
    for entry in tensors.values():
        q = entry.quant
        if q is None:
            continue
        if q.method == "qlora4":
            kind = f"quantized here as QLoRA does: bitsandbytes {q.param('quant_type')} (double quant)"
        elif q.method == "bnb8":
            kind = "stored as bitsandbytes int8"
        elif q.method == "mxfp4":
            kind = "stored as MXFP4"
        elif q.method == "fp8":
            kind = f"stored as FP8 e4m3, {q.param('block_rows')}x{q.param('block_cols')} block scales"
        else:
            nested = " (double quant)" if "nested_absmax" in dict(q.parts) else ""
            kind = f"stored as bitsandbytes {q.param('quant_type')}{nested}"
        if kind not in kinds:
            kinds.append(kind)
    return ", ".join(kinds)


def _model_dtype(config: dict[str, Any]) -> str:
    """The dtype config.json gives the model (transformers casts dequantized int8 weights to it); F32 if none."""
    name = config.get("dtype", config.get("torch_dtype"))
    return QS_DTYPES.get(name, "F32") if isinstance(name, str) else "F32"


def _bitsandbytes(path: Path, tensors: dict[str, TensorEntry], model_dtype: str) -> dict[str, TensorEntry]:
    claimed: dict[str, TensorEntry] = {}  # the weight's name -> its dequantizable entry
    parts: set[str] = set()
    for name, entry in tensors.items():
        if QS_PREFIX in name:
            weight = name.split(QS_PREFIX)[0]
            claimed[weight], used = _bnb4(path, weight, entry, tensors)
        elif name.endswith(".SCB"):
            weight = name[: -len(".SCB")] + ".weight"
            claimed[weight], used = _bnb8(path, weight, entry, tensors, model_dtype)
        else:
            continue
        parts.update(used)
    stray = next((n for n in tensors if n not in parts and n not in claimed and _is_part(n)), None)
    if stray is not None:
        raise CheckpointError(
            f"base `{path}`: `{stray}` is a bitsandbytes quantization tensor, but its weight has no quant_state "
            "(`.quant_state.bitsandbytes__nf4` / `__fp4`, or `.SCB`); the checkpoint is incomplete"
        )
    out = {}
    for name, entry in tensors.items():
        if name in claimed:
            out[name] = claimed[name]
        elif name not in parts:
            if entry.dtype in ("U8", "I8") and name.endswith(".weight") and len(entry.shape) == 2:
                raise CheckpointError(
                    f"base `{path}`: `{name}` is stored as {entry.dtype} with no bitsandbytes quant_state beside it; "
                    "the checkpoint is incomplete"
                )
            out[name] = entry
    return out


def _is_part(name: str) -> bool:
    return name.endswith(tuple(f".weight.{p}" for p in BNB4_PARTS)) or name.endswith(".weight_format")


def _bnb4(
    path: Path, weight: str, qs_entry: TensorEntry, tensors: dict[str, TensorEntry]
) -> tuple[TensorEntry, list[str]]:
    where = f"base `{path}`: `{qs_entry.name}`"
    state = _quant_state(where, qs_entry)
    suffix = qs_entry.name.split(QS_PREFIX)[1]
    quant_type = state.get("quant_type")
    if quant_type not in CODES or suffix != quant_type:
        raise CheckpointError(
            f"{where} has quant_type {quant_type!r}; bitsandbytes 4-bit knows `nf4` and `fp4` "
            "(and the name's suffix must say the same)"
        )
    blocksize, dtype, shape = state.get("blocksize"), state.get("dtype"), state.get("shape")
    if blocksize not in BLOCKSIZES:
        raise CheckpointError(f"{where} has blocksize {blocksize!r}; bitsandbytes uses one of {list(BLOCKSIZES)}")
    if dtype not in QS_DTYPES:
        raise CheckpointError(f"{where} has dtype {dtype!r}; bitsandbytes 4-bit restores float32, float16 or bfloat16")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where} has shape {shape!r}; expected a list of sizes")
    n = math.prod(shape)
    packed = _part(path, tensors, weight, qs_entry)
    if packed.nbytes != (n + 1) // 2:
        raise CheckpointError(
            f"base `{path}`: `{weight}` holds {packed.nbytes} bytes, but {shape} 4-bit values pack into {(n + 1) // 2}"
        )
    blocks = -(-n // blocksize)
    nested = f"{weight}.nested_absmax" in tensors
    absmax = _vector(path, tensors, f"{weight}.absmax", "U8" if nested else "F32", blocks, qs_entry)
    quant_map = _vector(path, tensors, f"{weight}.quant_map", "F32", 16, qs_entry)
    if not torch.equal(read_entry(quant_map), code_table(quant_type)):  # by value: fp4's -0.0 is stored as 0.0
        raise CheckpointError(
            f"base `{path}`: `{quant_map.name}` is not bitsandbytes' {quant_type} table, which its kernels use; "
            "the checkpoint was not written by bitsandbytes or is damaged"
        )
    roles = [("weight", packed), ("absmax", absmax), ("quant_map", quant_map)]
    params: list[tuple[str, int | float | str]] = [("quant_type", quant_type), ("blocksize", blocksize)]
    if nested:
        roles += _nested(path, tensors, weight, state, blocks, params, qs_entry)
    elif (
        state.keys() & {"nested_blocksize", "nested_dtype", "nested_offset"} or f"{weight}.nested_quant_map" in tensors
    ):
        raise CheckpointError(f"{where} describes double quantization, but `{weight}.nested_absmax` is missing")
    size = n * ITEMSIZE[QS_DTYPES[dtype]]
    entry = TensorEntry(
        weight,
        QS_DTYPES[dtype],
        tuple(shape),
        packed.file,
        packed.begin,
        size,
        Quantized("bnb4", tuple(roles), tuple(params)),
    )
    return entry, [qs_entry.name, *(e.name for _, e in roles)]


def _nested(
    path: Path,
    tensors: dict[str, TensorEntry],
    weight: str,
    state: dict[str, Any],
    blocks: int,
    params: list[tuple[str, int | float | str]],
    qs_entry: TensorEntry,
) -> list[tuple[str, TensorEntry]]:
    where = f"base `{path}`: `{qs_entry.name}`"
    nested_bs, offset = state.get("nested_blocksize"), state.get("nested_offset")
    if type(nested_bs) is not int or nested_bs <= 0:
        raise CheckpointError(f"{where} has nested_blocksize {nested_bs!r}; expected a positive integer")
    if type(offset) not in (int, float) or not math.isfinite(offset):
        raise CheckpointError(f"{where} has nested_offset {offset!r}; expected a number")
    if state.get("nested_dtype") != "float32":
        raise CheckpointError(f"{where} has nested_dtype {state.get('nested_dtype')!r}; bitsandbytes uses float32")
    nested_absmax = _vector(path, tensors, f"{weight}.nested_absmax", "F32", -(-blocks // nested_bs), qs_entry)
    nested_map = _vector(path, tensors, f"{weight}.nested_quant_map", "F32", 256, qs_entry)
    params += [("nested_blocksize", nested_bs), ("nested_offset", float(offset))]
    return [("nested_absmax", nested_absmax), ("nested_quant_map", nested_map)]


def _quant_state(where: str, entry: TensorEntry) -> dict[str, Any]:
    if entry.dtype != "U8" or len(entry.shape) != 1 or entry.nbytes > MAX_QUANT_STATE:
        raise CheckpointError(f"{where} is {entry.dtype} {list(entry.shape)}; a quant_state is a short U8 JSON string")
    try:
        state = json.loads(bytes(read_entry(entry).numpy()).decode("utf-8"))
    except (ValueError, OSError) as exc:
        raise CheckpointError(
            f"{where} is not a complete bitsandbytes quant_state ({' '.join(str(exc).split())[:120]})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is not a bitsandbytes quant_state (not a JSON object)")
    unknown = sorted(set(state) - BNB4_KEYS)
    if unknown:
        raise CheckpointError(f"{where} has keys this version does not know: {unknown}")
    return state


def _part(path: Path, tensors: dict[str, TensorEntry], name: str, qs_entry: TensorEntry) -> TensorEntry:
    entry = tensors.get(name)
    if entry is None:
        raise CheckpointError(f"base `{path}` has `{qs_entry.name}` but not `{name}`; the checkpoint is incomplete")
    return entry


def _vector(
    path: Path, tensors: dict[str, TensorEntry], name: str, dtype: str, length: int, qs_entry: TensorEntry
) -> TensorEntry:
    entry = _part(path, tensors, name, qs_entry)
    if entry.dtype != dtype or entry.shape != (length,):
        raise CheckpointError(
            f"base `{path}`: `{name}` is {entry.dtype} {list(entry.shape)}, but dequantizing its weight needs {dtype} [{length}]"
        )
    return entry


def _bnb8(
    path: Path, weight: str, scb: TensorEntry, tensors: dict[str, TensorEntry], dtype: str
) -> tuple[TensorEntry, list[str]]:
    """LLM.int8's weight and SCB, dequantized in float32 and rounded to the model's `dtype`, as
    transformers' `model.dequantize()` does."""
    packed = _part(path, tensors, weight, scb)
    if packed.dtype != "I8" or len(packed.shape) != 2:
        raise CheckpointError(
            f"base `{path}`: `{weight}` is {packed.dtype} {list(packed.shape)}; LLM.int8 stores I8 [out, in]"
        )
    scb = _vector(path, tensors, scb.name, "F32", packed.shape[0], scb)
    used = [scb.name]
    fmt_name = weight[: -len(".weight")] + ".weight_format"
    if fmt_name in tensors:
        fmt = tensors[fmt_name]
        if fmt.dtype != "U8" or fmt.shape != () or int(read_entry(fmt)) != 0:
            raise CheckpointError(
                f"base `{path}`: `{fmt_name}` is not 0 (row-major); only bitsandbytes' row layout is dequantized"
            )
        used.append(fmt_name)
    size = packed.numel * ITEMSIZE[dtype]
    quant = Quantized("bnb8", (("weight", packed), ("SCB", scb)))
    return TensorEntry(weight, dtype, packed.shape, packed.file, packed.begin, size, quant), used


def _fp8(path: Path, qc: dict[str, Any], tensors: dict[str, TensorEntry], dtype: str) -> dict[str, TensorEntry]:
    """Fine-grained FP8: each `X.weight` float8_e4m3fn with its block scales `X.weight_scale_inv`."""
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise CheckpointError(
            f"base `{path}`: FP8 `weight_block_size` is {block!r}; only block-scaled FP8 ([rows, columns]) is dequantized"
        )
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(
            f"base `{path}`: FP8 `activation_scheme` is {qc.get('activation_scheme')!r}; only `dynamic` is dequantized "
            "(static activation scales have no dense equivalent)"
        )
    out: dict[str, TensorEntry] = {}
    scales = {n for n in tensors if n.endswith(".weight_scale_inv")}
    for name, entry in tensors.items():
        if name in scales:
            continue
        scale = tensors.get(name + "_scale_inv")
        if entry.dtype == "F8_E4M3" and scale is None:
            raise CheckpointError(f"base `{path}`: `{name}` is FP8 with no `{name}_scale_inv` beside it")
        if scale is None:
            out[name] = entry
            continue
        if entry.dtype != "F8_E4M3" or len(entry.shape) != 2:
            raise CheckpointError(
                f"base `{path}`: `{name}` is {entry.dtype} {list(entry.shape)}; block-scaled FP8 is F8_E4M3 [out, in]"
            )
        grid = [-(-entry.shape[0] // block[0]), -(-entry.shape[1] // block[1])]
        if scale.dtype not in ("F32", "BF16") or list(scale.shape) != grid:
            raise CheckpointError(
                f"base `{path}`: `{scale.name}` is {scale.dtype} {list(scale.shape)}, but {list(entry.shape)} in "
                f"{block[0]}x{block[1]} blocks needs F32 {grid}"
            )
        quant = Quantized(
            "fp8",
            (("weight", entry), ("weight_scale_inv", scale)),
            (("block_rows", block[0]), ("block_cols", block[1])),
        )
        size = entry.numel * ITEMSIZE[dtype]
        out[name] = TensorEntry(name, dtype, entry.shape, entry.file, entry.begin, size, quant)
    stray = sorted(n for n in scales if n[: -len("_scale_inv")] not in tensors)
    if stray:
        raise CheckpointError(f"base `{path}`: `{stray[0]}` has no weight beside it; the checkpoint is incomplete")
    return out


def _mxfp4(path: Path, tensors: dict[str, TensorEntry], dtype: str) -> dict[str, TensorEntry]:
    """MXFP4: each `X_blocks` U8 [E, R, G, 16] with `X_scales` U8 [E, R, G] becomes `X` [E, G * 32, R]."""
    out: dict[str, TensorEntry] = {}
    for name, entry in tensors.items():
        if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in tensors:
            continue
        if not name.endswith("_blocks"):
            out[name] = entry
            continue
        target = name[: -len("_blocks")]
        scales = tensors.get(target + "_scales")
        if scales is None:
            raise CheckpointError(f"base `{path}`: `{name}` has no `{target}_scales` beside it")
        if entry.dtype != "U8" or len(entry.shape) != 4 or scales.dtype != "U8" or scales.shape != entry.shape[:3]:
            raise CheckpointError(
                f"base `{path}`: `{name}` is {entry.dtype} {list(entry.shape)} and `{scales.name}` {scales.dtype} "
                f"{list(scales.shape)}; MXFP4 stores U8 [E, R, G, 16] blocks and U8 [E, R, G] scales"
            )
        if target in tensors:
            raise CheckpointError(f"base `{path}` holds both `{target}` and its MXFP4 blocks")
        experts, rows, groups, width = entry.shape
        shape = (experts, groups * width * 2, rows)
        quant = Quantized("mxfp4", (("blocks", entry), ("scales", scales)))
        out[target] = TensorEntry(
            target, dtype, shape, entry.file, entry.begin, math.prod(shape) * ITEMSIZE[dtype], quant
        )
    return out
