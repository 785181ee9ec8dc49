"""The end-to-end reference's base when the base is stored quantized: the dense model it stands for.

PEFT's reference (gate/endtoend.py) wraps exactly the weights the release was merged into, the
dequantized ones. Where bitsandbytes is installed they come from transformers' own quantized load
followed by `model.dequantize()`, which runs bitsandbytes' kernels; FP8 and MXFP4 bases are loaded
with transformers' FineGrainedFP8Config / Mxfp4Config(dequantize=True): dequantizers independent of the merge's
(io/dequant.py). Without it, the model class is filled with io/dequant.py's values,
and the report says so: then the end-to-end check still tests the merge, not the dequantization.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.gate.fp8 import dense_values, ragged
from mergekit_lite.io.format import DTYPES, TensorEntry
from mergekit_lite.io.reader import TensorReader, read_entry

BY_BITSANDBYTES = "bitsandbytes (transformers' quantized load, then model.dequantize())"
BY_BITSANDBYTES_QLORA = (
    "bitsandbytes (transformers' load with BitsAndBytesConfig(load_in_4bit=True), then model.dequantize())"
)
BY_TRANSFORMERS_FP8 = "transformers (FineGrainedFP8Config(dequantize=True))"
BY_TRANSFORMERS_MXFP4 = "transformers (Mxfp4Config(dequantize=True))"
BY_MERGEKIT = "mergekit-lite's own dequantizer (bitsandbytes is not installed)"
BY_GATE_FP8 = "the gate's own FP8 dequantizer (transformers refuses blocks that do not divide a weight)"


def dequantizer(base: Path, tensors: dict[str, TensorEntry] | None = None) -> str:
    """Who dequantizes the reference's base here: the quantizer's own code where it is installed, and
    for FP8 weights transformers cannot dequantize (partial edge blocks, `tensors` shows) the gate's."""
    method = json.loads((base / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
    if method is None:  # a 16-bit base quantized as QLoRA does (`dequantize: nf4`)
        return BY_BITSANDBYTES_QLORA
    if method == "fp8":
        return BY_GATE_FP8 if tensors is not None and ragged(*_fp8_layout(tensors)) else BY_TRANSFORMERS_FP8
    if method == "mxfp4":
        return BY_TRANSFORMERS_MXFP4
    return BY_BITSANDBYTES if importlib.util.find_spec("bitsandbytes") is not None else BY_MERGEKIT


def dequantized_base(
    base: Path,
    tensors: dict[str, TensorEntry],
    dtype: torch.dtype,
    loading: dict[str, Any],
    model_class: str | None = None,
):
    """(the base as a dense transformers model in `dtype`, who dequantized it), of the transformers
    class the release is loaded with (`model_class`: a classification head, a seq2seq model; a
    causal LM when None)."""
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, model_class or "AutoModelForCausalLM")
    by = dequantizer(base)
    if by == BY_TRANSFORMERS_FP8 and ragged(*_fp8_layout(tensors)):
        by = BY_GATE_FP8
    device_map = loading.get("device_map", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if by in (BY_BITSANDBYTES, BY_BITSANDBYTES_QLORA):
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its import warns about a CPU kernel
            model = cls.from_pretrained(base, device_map=device_map, **_qlora(tensors))
            model.dequantize()
            return model.to(dtype), by
        if by in (BY_TRANSFORMERS_FP8, BY_TRANSFORMERS_MXFP4):
            from transformers import FineGrainedFP8Config, Mxfp4Config

            config = (FineGrainedFP8Config if by == BY_TRANSFORMERS_FP8 else Mxfp4Config)(dequantize=True)
            model = cls.from_pretrained(base, quantization_config=config, device_map=device_map)
            return model.to(dtype), by
    config = AutoConfig.from_pretrained(base)
    config.quantization_config = None
    del config.quantization_config
    model = (
        cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") else cls._from_config(config, dtype=dtype)
    )
    reader = TensorReader(tensors)
    state = {
        name: _values(reader, entry, dtype) if by == BY_GATE_FP8 else reader.get(name).to(dtype)
        for name, entry in tensors.items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - set(
        name for name, _ in model.named_parameters()
    )
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"the dequantized base does not fit its model class: {sorted(missing)} {sorted(unexpected)}")
    model.tie_weights()
    return model, by if by == BY_GATE_FP8 else BY_MERGEKIT


def _fp8_layout(tensors: dict[str, TensorEntry]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, int]]]:
    """The FP8 weights' shapes and blocks."""
    fp8 = {n: e for n, e in tensors.items() if e.quant is not None and e.quant.method == "fp8"}
    blocks = {n: (int(e.quant.param("block_rows")), int(e.quant.param("block_cols"))) for n, e in fp8.items()}  # type: ignore[union-attr]
    return {n: e.shape for n, e in fp8.items()}, blocks


def _values(reader: TensorReader, entry: TensorEntry, dtype: torch.dtype) -> torch.Tensor:
    """A base tensor in `dtype`: an FP8 one dequantized by the gate's own code from its stored parts,
    rounded to the base's dtype as transformers' Fp8Dequantize does; the others as stored."""
    q = entry.quant
    if q is None or q.method != "fp8":
        return reader.get(entry.name).to(dtype)
    block = (int(q.param("block_rows")), int(q.param("block_cols")))
    codes, inv = read_entry(q.part("weight")), read_entry(q.part("weight_scale_inv"))
    return dense_values(codes, inv, block, DTYPES[entry.dtype]).to(dtype)


def _qlora(tensors: dict[str, TensorEntry]) -> dict[str, Any]:
    """from_pretrained's quantization_config for a 16-bit base read as QLoRA's weights, else nothing."""
    kinds = {
        e.quant.param("quant_type") for e in tensors.values() if e.quant is not None and e.quant.method == "qlora4"
    }
    if not kinds:
        return {}
    from transformers import BitsAndBytesConfig

    (quant_type,) = kinds
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True
        )
    }
