"""Run a release in another Python, one that has transformers 4 (a script, not a module of the package).

    python transformers4_worker.py REQUEST.json OUT.safetensors

REQUEST: {"release": folder, "texts": [...] or null, "chat": bool, "ids": [[int]], "new_tokens": n}.
It loads the release as a transformers 4 user would (AutoTokenizer, AutoModelForCausalLM in
float32) and writes, per prompt i: `encoded.i` (its own encoding of texts[i], chat-formatted when
`chat`), `logits.i` (its logits on ids[i], the gate's encoding) and `greedy.i` (n greedy tokens
after ids[i]). It imports nothing from mergekit_lite: that Python need not have it.
"""

from __future__ import annotations

import json
import sys
import warnings


def main(request_path: str, out_path: str) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    request = json.loads(open(request_path, encoding="utf-8").read())
    folder = request["release"]
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder) if request["texts"] is not None else None
        for i, text in enumerate(request["texts"] or []):
            if request["chat"]:
                enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
                enc = enc["input_ids"] if isinstance(enc, dict) else enc
            else:
                enc = tokenizer(text)["input_ids"]
            out[f"encoded.{i}"] = torch.tensor(list(enc), dtype=torch.int64)
        for i, ids in enumerate(request["ids"]):
            seq = torch.tensor([ids], dtype=torch.int64)
            n = request["new_tokens"]
            with torch.no_grad():
                out[f"logits.{i}"] = model(input_ids=seq).logits[0].float().contiguous()
                if n == 0:
                    out[f"greedy.{i}"] = torch.zeros(0, dtype=torch.int64)
                    continue
                generated = model.generate(
                    input_ids=seq,
                    attention_mask=torch.ones_like(seq),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    pad_token_id=0,
                )
            out[f"greedy.{i}"] = generated[0, seq.shape[1] :].contiguous()
    save_file(out, out_path, metadata={"transformers": transformers.__version__, "torch": torch.__version__})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
