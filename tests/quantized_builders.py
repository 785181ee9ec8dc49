"""Tiny Llama bases quantized by bitsandbytes on CPU, saved by transformers in the real packed
layout, and a way to damage them (tests/test_quantized.py).

bitsandbytes prints a warning on import about a CPU kernel it cannot fetch; it is silenced here.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from builders import BASE_CONFIGS, save_base

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

WEIGHT = "model.layers.0.self_attn.q_proj.weight"  # a quantized weight, which the damages below change


@dataclass(frozen=True)
class Variant:
    """How a base is quantized: bitsandbytes 4-bit (`quant_type`) or 8-bit (`int8`), or FP8 in
    blocks of `fp8_block` (rows, columns)."""

    quant_type: str = "nf4"
    double: bool = False
    storage: torch.dtype = torch.uint8
    blocksize: int = 64  # not 64: re-quantized after saving (transformers always uses 64)
    int8: bool = False
    fp8_block: tuple[int, int] | None = None


VARIANTS = {
    "nf4-dq": Variant("nf4", double=True),
    "nf4": Variant("nf4"),
    "fp4-dq": Variant("fp4", double=True),
    "fp4": Variant("fp4"),
    "nf4-dq-bf16-storage": Variant("nf4", double=True, storage=torch.bfloat16),
    "nf4-dq-block128": Variant("nf4", double=True, blocksize=128),
    "fp4-block32": Variant("fp4", blocksize=32),
    "int8": Variant(int8=True),
    "fp8-16": Variant(fp8_block=(16, 16)),
    "fp8-8x32": Variant(fp8_block=(8, 32)),
}


class QuantZoo:
    """A bfloat16 tiny Llama and its quantized versions, each built once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[str, Path] = {}

    def dense(self) -> Path:
        if "dense" not in self._done:
            f32 = save_base(BASE_CONFIGS["llama"](), self.root / "dense-f32")
            self._done["dense"] = _resave(f32, self.root / "dense", torch.bfloat16)
        return self._done["dense"]

    def quantized(self, name: str) -> Path:
        if name not in self._done:
            if name == "mxfp4":
                self._done[name] = mxfp4(self.gpt_oss(), self.root / name)
            else:
                self._done[name] = quantize(self.dense(), self.root / name, VARIANTS[name])
        return self._done[name]

    def gpt_oss(self) -> Path:
        """A tiny bfloat16 gpt-oss (4 experts), the dense model its MXFP4 version stands for."""
        if "gpt_oss" not in self._done:
            from transformers import AutoModelForCausalLM, GptOssConfig

            config = GptOssConfig(
                vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                max_position_embeddings=64, layer_types=["sliding_attention", "full_attention"], sliding_window=16,
            )  # fmt: skip
            torch.manual_seed(5)
            model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
            with torch.no_grad():
                for param in model.parameters():
                    param.normal_(0, 0.05)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(self.root / "gpt_oss")
            self._done["gpt_oss"] = self.root / "gpt_oss"
        return self._done["gpt_oss"]

    def adapter(self, base: Path, targets: list[str]) -> Path:
        """A PEFT LoRA on `base` (init_lora_weights=False, so that it changes the model)."""
        out = self.root / f"lora-{base.name}"
        if not out.exists():
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            torch.manual_seed(11)
            model = AutoModelForCausalLM.from_pretrained(base)
            config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                get_peft_model(model, config).save_pretrained(out)
        return out


def _resave(src: Path, out: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(out)
    return out


def quantize(dense: Path, out: Path, v: Variant) -> Path:
    """`dense` quantized by transformers + bitsandbytes on CPU and saved to `out` (FP8: by fp8_blocks)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if v.fp8_block is not None:
        return fp8_blocks(dense, out, v.fp8_block)
    if v.int8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=v.quant_type,
            bnb_4bit_use_double_quant=v.double,
            bnb_4bit_quant_storage=v.storage,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            dense, quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
        )
        model.save_pretrained(out)
    if v.blocksize != 64:
        _requantize(dense, out, v)
    return out


def _requantize(dense: Path, out: Path, v: Variant) -> None:
    """Replace each 4-bit weight's parts by bitsandbytes' quantize_4bit at `v.blocksize`, serialized
    as Params4bit does (QuantState.as_dict(packed=True))."""
    import bitsandbytes.functional as F

    original = load_file(dense / "model.safetensors")
    tensors = load_file(out / "model.safetensors")
    for name in [n for n in tensors if ".quant_state." in n]:
        weight = name.split(".quant_state.")[0]
        for key in [k for k in tensors if k == weight or k.startswith(weight + ".")]:
            del tensors[key]
        packed, state = F.quantize_4bit(
            original[weight], blocksize=v.blocksize, quant_type=v.quant_type, compress_statistics=v.double
        )
        tensors[weight] = packed
        for key, value in state.as_dict(packed=True).items():
            tensors[f"{weight}.{key}"] = value
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def fp8_blocks(dense: Path, out: Path, block: tuple[int, int]) -> Path:
    """`dense` in transformers' FineGrainedFP8 layout, quantized as its FP8 quantizer does: every
    Linear weight float8_e4m3fn, scaled per block by amax / 448 (stored as `weight_scale_inv`)."""
    shutil.copytree(dense, out)
    tensors = load_file(out / "model.safetensors")
    bo, bi = block
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        w = tensors[name].float()
        rows, cols = w.shape
        grid = w.reshape(rows // bo, bo, cols // bi, bi)
        scale = grid.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max
        tensors[name] = (grid / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [bo, bi],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4(dense: Path, out: Path) -> Path:
    """`dense` gpt-oss with its experts in the MXFP4 layout gpt-oss ships: per group of 32 values
    a shared exponent (ceil(log2(amax / 6)), biased by 127) and the nearest e2m1 code of each value,
    two codes a byte, the first in the low nibble."""
    shutil.copytree(dense, out)
    tensors = load_file(out / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = tensors.pop(name).float().transpose(1, 2)  # [E, R, C], the packed rows
        experts, rows, cols = w.shape
        groups = w.reshape(experts, rows, cols // 32, 32)
        exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).to(torch.int32)
        scaled = groups / torch.pow(2.0, exponent.float())[..., None]
        codes = (scaled[..., None] - E2M1).abs().argmin(-1).to(torch.uint8)
        tensors[name + "_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
        tensors[name + "_scales"] = (exponent + 127).to(torch.uint8)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def damaged(src: Path, out: Path, change) -> Path:
    """A copy of the checkpoint `src` at `out` whose tensors `change(tensors)` (if given) has edited in place."""
    shutil.copytree(src, out)
    if change is None:
        return out
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def bnb_dequantized(folder) -> dict[str, torch.Tensor]:
    """The quantizer's own dequantization of every tensor: for bitsandbytes, transformers' load then
    model.dequantize() (bitsandbytes' dequantize_4bit / int8_vectorwise_dequant); for FP8,
    transformers' load with FineGrainedFP8Config(dequantize=True); MXFP4 likewise with Mxfp4Config."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    method = json.loads((Path(folder) / "config.json").read_text())["quantization_config"].get("quant_method")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method in ("fp8", "mxfp4"):
            config = (FineGrainedFP8Config if method == "fp8" else Mxfp4Config)(dequantize=True)
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
            model.dequantize()
    return {k: v.detach() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- damages


def _state_name(tensors):
    return next(k for k in tensors if k.startswith(WEIGHT + ".quant_state."))


def truncated_state(tensors):
    name = _state_name(tensors)
    tensors[name] = tensors[name][: len(tensors[name]) // 2].clone()


def short_absmax(tensors):
    tensors[WEIGHT + ".absmax"] = tensors[WEIGHT + ".absmax"][:-1].clone()


def unknown_quant_type(tensors):
    name = _state_name(tensors)
    state = json.loads(bytes(tensors[name].tolist()))
    state["quant_type"] = "nf3"
    tensors[name] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def other_table(tensors):
    tensors[WEIGHT + ".quant_map"] = tensors[WEIGHT + ".quant_map"].flip(0).clone()


def no_quant_state(tensors):
    del tensors[_state_name(tensors)]


def short_scb(tensors):
    name = WEIGHT.replace(".weight", ".SCB")
    tensors[name] = tensors[name][:-1].clone()


def fp8_wrong_grid(tensors):
    name = WEIGHT + "_scale_inv"
    tensors[name] = tensors[name][:, :1].clone()
