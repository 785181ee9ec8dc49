"""Run a GGUF file in llama.cpp's C++ runtime, through llama-cpp-python (a script, not a module of the package).

    python -I llama_cpp_worker.py REQUEST.json OUT.safetensors

REQUEST: {"site": folder holding `llama_cpp` (put first on sys.path) or null, "gguf": file,
"ids": [[int]], "new_tokens": n, "suppress": [int], "threads": t, "f32_cache": bool}.
It loads the file with `llama_cpp.Llama` (CPU, `logits_all`, t threads, the KV cache in float32 when
`f32_cache`, else llama.cpp's default float16) and writes, per prompt i: `logits.i` (llama.cpp's logits
on ids[i], fed as token ids: no BOS added, no tokenizer of its own in the way) and `greedy.i` (n
greedy tokens after ids[i]: the arg max of llama.cpp's logits, the `suppress` ids never chosen, as
transformers' min_new_tokens does with the end-of-sequence ids), then `eog` (the ids llama.cpp ends a
generation at) and `eog_control` (1 where that id is a control token). It is run in a process of its
own, so a crash in the C++ runtime fails the check instead of the merge. It imports nothing from
mergekit_lite.
"""

from __future__ import annotations

import json
import sys


def main(request_path: str, out_path: str) -> None:
    request = json.loads(open(request_path, encoding="utf-8").read())
    if request["site"]:
        sys.path.insert(0, request["site"])
    import llama_cpp
    import numpy as np
    from safetensors.numpy import save_file

    threads, longest = request["threads"], max((len(s) for s in request["ids"]), default=1)
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if request["f32_cache"] else {}
    llm = llama_cpp.Llama(
        model_path=request["gguf"],
        n_gpu_layers=0,
        n_ctx=longest + request["new_tokens"] + 8,
        n_batch=max(longest, 8),
        n_ubatch=max(longest, 8),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        seed=0,
        verbose=False,
        **cache,
    )
    out: dict[str, np.ndarray] = {}
    suppress = [i for i in request["suppress"] if 0 <= i < llm.n_vocab()]
    for i, ids in enumerate(request["ids"]):
        llm.reset()
        llm.eval(ids)
        out[f"logits.{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
        greedy = []
        for _ in range(request["new_tokens"]):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            row[suppress] = -np.inf
            greedy.append(int(row.argmax()))
            llm.eval([greedy[-1]])
        out[f"greedy.{i}"] = np.array(greedy, dtype=np.int64)
    vocab = llm._model.vocab
    eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    control = [bool(llama_cpp.llama_vocab_get_attr(vocab, t) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL) for t in eog]
    out["eog"] = np.array(eog, dtype=np.int64)
    out["eog_control"] = np.array(control, dtype=np.int64)
    save_file(out, out_path, metadata={"llama-cpp-python": llama_cpp.__version__})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
