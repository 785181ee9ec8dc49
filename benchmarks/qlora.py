"""QLoRA's choice, measured on the bundled SmolLM2 example (README, "Quantized bases and QLoRA").

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/qlora.py [--example .cache/examples] [--out dist/qlora-bench]

Merges the example's adapter in bfloat16 twice: into the 16-bit base, and into the weights a QLoRA
run trains against (`base: {path: ..., dequantize: nf4}`: bitsandbytes nf4, double quant). Then
compares, in float32 on the demo's prompts (chat formatted), each release with two references of
base + adapter, unmerged (PEFT): on the 16-bit base, and on the nf4 base (transformers' 4-bit load
with bitsandbytes, dequantized): max |logit difference| and top-1 agreement over all positions.
Needs bitsandbytes (`pip install bitsandbytes`) and `mergekit-lite example prepare`.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch
import yaml

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
PROMPTS = ["What is mergekit-lite?", "What is the capital of France?", "Write a haiku about the sea."]


def release(example: Path, out: Path, dequantize: str | None) -> Path:
    from mergekit_lite.pipeline import run_merge

    base: object = str(example / "SmolLM2-135M-Instruct")
    if dequantize:
        base = {"path": base, "dequantize": dequantize}
    name = f"release-{dequantize or '16bit'}"
    manifest = {
        "base": base,
        "adapters": [str(example / "smollm2-mergekit-lora")],
        "dtype": "bfloat16",
        "output": {"path": str(out / name), "overwrite": True},
        "verify": {"logits": False},
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return run_merge(path)


def reference(example: Path, nf4: bool):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = example / "SmolLM2-135M-Instruct"
    if nf4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
        model.dequantize()
        model = model.float()
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, example / "smollm2-mergekit-lora").eval()


def logits(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=x[None]).logits[0].double() for x in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", type=Path, default=Path(".cache/examples"))
    parser.add_argument("--out", type=Path, default=Path("dist/qlora-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_lite.tools.example import chat_ids

    warnings.simplefilter("ignore")
    tokenizer = AutoTokenizer.from_pretrained(args.example / "SmolLM2-135M-Instruct")
    ids = [torch.tensor(chat_ids(tokenizer, p)) for p in PROMPTS]
    refs = {name: logits(reference(args.example, nf4), ids) for name, nf4 in (("16-bit", False), ("nf4", True))}
    print("| release merged into | reference: base + adapter on | max abs logit diff | top-1 agreement |")
    print("|---|---|---|---|")
    for dequantize in (None, "nf4"):
        folder = release(args.example, args.out, dequantize)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        got = logits(model, ids)
        for name, ref in refs.items():
            diff = max(float((a - b).abs().max()) for a, b in zip(got, ref))
            agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).double() for a, b in zip(got, ref)]).mean()
            print(f"| {'nf4 (dequantize: nf4)' if dequantize else '16-bit base'} | {name} | {diff:.3f} | {agree:.3f} |")


if __name__ == "__main__":
    main()
