"""Tiny Llamas in transformers' fine-grained FP8 layout (128x128 blocks), quantized by transformers'
own FP8 quantizer (`Fp8Quantize`), and what a correct FP8 release of a merge must hold
(tests/test_fp8_release.py).

`square`: every Linear's dimensions are multiples of 128 (transformers loads and dequantizes it on
a CPU); `ragged`: the MLP's 320 is not, and its weights have partial edge blocks on the ceil grid
DeepSeek-V3 publishes (`weight_scale_inv` [ceil(rows / 128), ceil(cols / 128)]), quantized as
transformers' quantizer does the weight padded with zeros to the grid.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from builders import save_base

BLOCK = (128, 128)
QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
TARGETS = ["q_proj", "v_proj", "down_proj", "gate_proj"]  # k_proj, o_proj and up_proj stay as the base has them


def llama_config(intermediate: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=200, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip


def transformers_quantize(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, weight_scale_inv) of `w` by transformers' Fp8Quantize; a shape that is not a multiple
    of the block is padded with zeros to the grid first and the codes cut back."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = SimpleNamespace(weight_block_size=list(block), scale_fmt="float")
    rows, cols = w.shape
    padded = torch.zeros(-(-rows // block[0]) * block[0], -(-cols // block[1]) * block[1], dtype=w.dtype)
    padded[:rows, :cols] = w
    out = Fp8Quantize(SimpleNamespace(quantization_config=config)).convert({"x.weight": padded})
    return out["x.weight"][:rows, :cols].contiguous(), out["x.weight_scale_inv"]


class Fp8Zoo:
    """bfloat16 tiny Llamas and their FP8 versions, each built once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[str, Path] = {}

    def dense(self, kind: str) -> Path:
        name = f"dense-{kind}"
        if name not in self._done:
            f32 = save_base(llama_config(384 if kind == "square" else 320), self.root / f"{name}-f32")
            from transformers import AutoModelForCausalLM

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(f32, dtype=torch.bfloat16)
                model.save_pretrained(self.root / name)
            self._done[name] = self.root / name
        return self._done[name]

    def fp8(self, kind: str) -> Path:
        """The dense model's every `*_proj.weight` in FP8, 128x128 blocks, config.json saying so."""
        name = f"fp8-{kind}"
        if name not in self._done:
            out = self.root / name
            shutil.copytree(self.dense(kind), out)
            tensors = load_file(out / "model.safetensors")
            for key in [k for k in tensors if k.endswith("proj.weight")]:
                tensors[key], tensors[key + "_scale_inv"] = transformers_quantize(tensors[key].float())
            save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
            config = json.loads((out / "config.json").read_text())
            config["quantization_config"] = dict(QUANTIZATION_CONFIG)
            (out / "config.json").write_text(json.dumps(config, indent=2))
            self._done[name] = out
        return self._done[name]

    def adapter(self, kind: str) -> Path:
        """A PEFT LoRA on the dense model (init_lora_weights=False, factors scaled up so that the change
        is several e4m3 steps: a release quantized without it is far from the merge)."""
        out = self.root / f"lora-{kind}"
        if not out.exists():
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            torch.manual_seed(7)
            model = AutoModelForCausalLM.from_pretrained(self.dense(kind), dtype=torch.float32)
            config = LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
            peft_model = get_peft_model(model, config)
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if "lora_B" in name:
                        param.mul_(4.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model.save_pretrained(out)
        return out


def dequantized_base(folder: Path, dtype: torch.dtype = torch.bfloat16):
    """The FP8 base as transformers loads it on a CPU: FineGrainedFP8Config(dequantize=True), in `dtype`."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, quantization_config=FineGrainedFP8Config(dequantize=True)
        ).eval()


def own_dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """The FP8 base's tensors dequantized by its stored parts (float32(code) x block scale, then
    bfloat16, as Fp8Dequantize does), for the ragged base transformers refuses to dequantize."""
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, value in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is None:
            out[name] = value
            continue
        grid = scale.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[: value.shape[0], : value.shape[1]]
        out[name] = (value.float() * grid).to(torch.bfloat16)
    return out
