"""PEFT's own merge path, the baseline of benchmarks/speed.py: load, merge_and_unload, save_pretrained.

.venv/bin/python benchmarks/peft_merge.py BASE ADAPTER OUTPUT
"""

from __future__ import annotations

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(base: str, adapter: str, output: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(output)


if __name__ == "__main__":
    main(*sys.argv[1:4])
