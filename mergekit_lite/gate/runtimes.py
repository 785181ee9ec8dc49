"""Gate check 5, runtimes (optional, `verify.runtimes`): the release in the runtime it is deployed to.

`ctranslate2`: the release converted by CTranslate2's own TransformersConverter (what
`ct2-transformers-converter` runs) at float32 into a temporary folder and run by its Generator on
the CPU: the prompts' logits (`forward_batch`) and exactly max_new_tokens greedy tokens
(`generate_batch`, top-1) against transformers 5's, as for transformers 4. This is what catches a
config field CTranslate2's converter reads differently from transformers (a RoPE setting it
ignores or misreads), which no transformers check can see.

`onnxruntime-genai`: the release exported by onnxruntime-genai's own model builder
(`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`) into a temporary folder and run by
its Generator: the prompts' logits (`get_output("logits")` after appending the prompt) and exactly
max_new_tokens greedy tokens, against transformers 5's, as above. Its attention kernel needs a head
size that is a multiple of 16: a release without one fails the check saying so.

`transformers4`: the release loaded by transformers 4 in a Python of its own (a separate virtual
environment: transformers 4 and 5 cannot share one), as its users load it, against transformers 5
in this process, both in float32: the prompts encode alike, max |logit diff| on the gate's
encoding, and greedy continuations (a divergence at a near-tie of transformers 5 counts as
agreement, as in the end-to-end check). This is what catches a config that transformers 4 reads
differently (a RoPE value in one layout only) or a tokenizer it cannot load.

The Python is $MERGEKIT_LITE_TRANSFORMERS4 or, by default, `.cache/runtimes/transformers4/bin/python`
in the working folder (what `make runtimes` builds: torch==2.13.0 CPU and transformers 4.57).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergekit_lite.errors import InputError
from mergekit_lite.gate.endtoend import DEFAULT_PROMPTS, _agrees, _forward, _generate, prompt_ids
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.tolerances import RUNTIME_TOLERANCES

ENV = "MERGEKIT_LITE_TRANSFORMERS4"
DEFAULT_PYTHON = Path(".cache/runtimes/transformers4/bin/python")
WORKER = Path(__file__).with_name("transformers4_worker.py")
HOW_TO_INSTALL = (
    "make one with `make runtimes` (.cache/runtimes/transformers4: `pip install torch==2.13.0 "
    "'transformers>=4.45,<5'` in a new virtual environment), or set MERGEKIT_LITE_TRANSFORMERS4 to "
    "the python of an environment that has transformers 4 (it cannot share one with transformers 5)"
)
TIMEOUT_S = 1800
# runtime -> (modules it imports, its distribution, its name): the Python runtimes, in this environment
PACKAGES = {
    "ctranslate2": (("ctranslate2",), "ctranslate2", "CTranslate2"),
    "onnxruntime-genai": (("onnxruntime_genai", "onnx", "onnx_ir"), "onnxruntime-genai", "onnxruntime-genai"),
}


def transformers4_python() -> Path:
    """The Python that runs transformers 4 (not checked)."""
    return Path(os.environ.get(ENV) or DEFAULT_PYTHON).absolute()


def causal_lm(model_class: str | None) -> bool:
    """Whether the release is a causal LM, the kind of model every runtime check loads and generates
    with (a class not known to the plan is taken for one, as the end-to-end check takes it)."""
    return model_class is None or model_class.endswith(("ForCausalLM", "LMHeadModel"))


def check_runtimes_available(runtimes: list[str], model_class: str | None = None) -> dict[str, str]:
    """Refuse, before anything is written, a runtime that is not installed, or any runtime for a
    release that is not a causal LM (a classifier, an encoder-decoder, a vision-language model: the
    runtimes' checks load and generate with a causal LM); its version otherwise."""
    if runtimes and not causal_lm(model_class):
        raise InputError(
            f"`verify.runtimes: [{', '.join(runtimes)}]`: the runtime checks run causal language models, and "
            f"this base loads as {model_class} (the end-to-end check covers it in transformers 5); "
            "remove verify.runtimes"
        )
    found = {}
    for runtime in runtimes:
        if runtime == "llama.cpp":  # found with its converter by the plan (gate/llama_cpp.py)
            continue
        if runtime in PACKAGES:
            modules, distribution, name = PACKAGES[runtime]
            if any(importlib.util.find_spec(m) is None for m in modules):
                raise InputError(
                    f"`verify.runtimes: [{runtime}]`: {name} is not installed; `pip install 'mergekit-lite[{runtime}]'`"
                )
            found[runtime] = importlib.metadata.version(distribution)
            continue
        python = transformers4_python()
        if not python.is_file():
            raise InputError(f"`verify.runtimes: [{runtime}]`: no Python at `{python}`; {HOW_TO_INSTALL}")
        probe = subprocess.run(
            [str(python), "-I", "-c", "import transformers, torch; print(transformers.__version__)"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        version = probe.stdout.strip()
        if probe.returncode != 0 or not version.startswith("4."):
            got = f"transformers {version}" if probe.returncode == 0 else "no transformers and torch"
            raise InputError(f"`verify.runtimes: [{runtime}]`: `{python}` has {got}; {HOW_TO_INSTALL}")
        found[runtime] = version
    return found


def check_transformers4(
    report: GateReport, candidate: Path, tokenizer: Any, prompts: list[str] | None, new_tokens: int
) -> None:
    """Record the transformers 4 check of `candidate` (its packaged `tokenizer`, or None)."""
    model, ids, how = _release_and_prompts(candidate, tokenizer, prompts)
    texts = None if tokenizer is None else list(prompts or DEFAULT_PROMPTS)
    theirs, versions = _run_worker(candidate, texts, bool(getattr(tokenizer, "chat_template", None)), ids, new_tokens)
    report.context.setdefault("runtimes", {})["transformers4"] = {**versions, "prompts": how}
    name = "transformers4"
    if texts is not None:
        differ = [i for i, seq in enumerate(ids) if theirs[f"encoded.{i}"].tolist() != seq.tolist()]
        report.add(
            "runtimes",
            f"{name}: prompts encode as with transformers 5",
            not differ,
            figure=len(differ),
            threshold=0,
            detail=f"first: prompt {differ[0]}" if differ else "",
        )
    _compare(report, name, model, ids, theirs, new_tokens)


def _run_worker(
    candidate: Path, texts: list[str] | None, chat: bool, ids: list[torch.Tensor], new_tokens: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The worker's tensors and the versions it ran with; a failed run raises (the group fails)."""
    from safetensors import safe_open

    request = {
        "release": str(candidate),
        "texts": texts,
        "chat": chat,
        "ids": [seq.tolist() for seq in ids],
        "new_tokens": new_tokens,
    }
    with tempfile.TemporaryDirectory(prefix="mergekit-t4-") as tmp:
        (Path(tmp) / "request.json").write_text(json.dumps(request), encoding="utf-8")
        out = Path(tmp) / "out.safetensors"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # -I: neither PYTHONPATH nor the script's folder (gate/packaging.py would shadow `packaging`) on its path
        run = subprocess.run(
            [str(transformers4_python()), "-I", str(WORKER), str(Path(tmp) / "request.json"), str(out)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=env,
        )
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"transformers 4 could not run the release: {last}")
        with safe_open(str(out), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _greedy_share(
    model, ids: list[torch.Tensor], theirs: dict[str, torch.Tensor], n: int, tie: float
) -> tuple[float, str]:
    """Share of prompts whose n greedy tokens agree with transformers 5's (a first divergence at a
    near-tie of transformers 5 counts as agreement); the first real divergence, described."""
    if n == 0:
        return 1.0, "no tokens requested"
    same, first = 0, ""
    for i, seq in enumerate(ids):
        a, b = _generate(model, seq, n), theirs[f"greedy.{i}"].tolist()
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None and len(a) == len(b):
            same += 1
            continue
        k = k if k is not None else min(len(a), len(b))
        if k < len(b):
            prefix = torch.cat([seq, torch.tensor(a[:k], dtype=seq.dtype)])
            if bool(_agrees(_forward(model, prefix)[-1], torch.tensor(b[k]), tie)):
                same += 1
                continue
        first = first or f"prompt {i} differs at token {k}"
    return same / len(ids), first


def check_ctranslate2(
    report: GateReport, candidate: Path, tokenizer: Any, prompts: list[str] | None, new_tokens: int
) -> None:
    """Record the CTranslate2 check of `candidate` (its packaged `tokenizer`: CTranslate2 takes tokens
    as text, so a release without one cannot be run)."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    if tokenizer is None:
        raise RuntimeError("CTranslate2 takes tokens as text: the release ships no tokenizer to give them")
    model, ids, how = _release_and_prompts(candidate, tokenizer, prompts)
    with tempfile.TemporaryDirectory(prefix="mergekit-ct2-") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            TransformersConverter(str(candidate), load_as_float16=False).convert(
                str(Path(tmp) / "model"), quantization="float32", force=True
            )
        generator = ctranslate2.Generator(str(Path(tmp) / "model"), device="cpu", compute_type="float32")
        tokens = [tokenizer.convert_ids_to_tokens(seq.tolist()) for seq in ids]
        theirs: dict[str, torch.Tensor] = {}
        for i, toks in enumerate(tokens):
            logits = generator.forward_batch([toks])
            theirs[f"logits.{i}"] = torch.from_numpy(np.asarray(logits)[0]).double()
            if new_tokens:
                (result,) = generator.generate_batch(
                    [toks],
                    max_length=new_tokens,
                    min_length=new_tokens,
                    sampling_topk=1,
                    include_prompt_in_result=False,
                )
                theirs[f"greedy.{i}"] = torch.tensor(result.sequences_ids[0])
    report.context.setdefault("runtimes", {})["ctranslate2"] = {
        "ctranslate2": importlib.metadata.version("ctranslate2"),
        "prompts": how,
    }
    _compare(report, "ctranslate2", model, ids, theirs, new_tokens)


def check_onnxruntime_genai(
    report: GateReport, candidate: Path, tokenizer: Any, prompts: list[str] | None, new_tokens: int
) -> None:
    """Record the onnxruntime-genai check of `candidate` (token ids in, so `tokenizer` may be None)."""
    import onnxruntime_genai as og

    model, ids, how = _release_and_prompts(candidate, tokenizer, prompts)
    theirs: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="mergekit-ortgenai-") as tmp:
        out, cache = Path(tmp) / "model", Path(tmp) / "cache"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        build = subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(candidate), "-o", str(out)]
            + ["-p", "fp32", "-e", "cpu", "-c", str(cache)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=env,
            cwd=tmp,
        )
        if build.returncode != 0:
            last = ([line for line in build.stderr.splitlines() if line.strip()] or ["no output"])[-1]
            raise RuntimeError(f"onnxruntime-genai's model builder could not export the release: {last.strip()}")
        runtime = og.Model(str(out))
        for i, seq in enumerate(ids):
            params = og.GeneratorParams(runtime)
            length = len(seq) + max(new_tokens, 1)
            params.set_search_options(max_length=length, min_length=length, do_sample=False)
            generator = og.Generator(runtime, params)
            generator.append_tokens(np.asarray([seq.tolist()], dtype=np.int32))
            logits = np.asarray(generator.get_output("logits"))
            theirs[f"logits.{i}"] = torch.from_numpy(logits.reshape(-1, logits.shape[-1])).double()
            greedy = []
            for _ in range(new_tokens):
                if generator.is_done():
                    break
                generator.generate_next_token()
                greedy.append(int(generator.get_next_tokens()[0]))
            theirs[f"greedy.{i}"] = torch.tensor(greedy, dtype=torch.long)
            del generator
    report.context.setdefault("runtimes", {})["onnxruntime-genai"] = {
        "onnxruntime-genai": importlib.metadata.version("onnxruntime-genai"),
        "prompts": how,
    }
    _compare(report, "onnxruntime-genai", model, ids, theirs, new_tokens)


def _release_and_prompts(
    candidate: Path, tokenizer: Any, prompts: list[str] | None
) -> tuple[Any, list[torch.Tensor], str]:
    """The release in transformers 5, float32, and the prompts' token ids (and how they were made)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(candidate, dtype=torch.float32).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids, how = prompt_ids(tokenizer, prompts, vocab)
    return model, ids, how


def _compare(
    report: GateReport,
    name: str,
    model,
    ids: list[torch.Tensor],
    theirs: dict[str, torch.Tensor],
    new_tokens: int,
    limits: dict[str, float] | None = None,
) -> None:
    """The two rows of a runtime: max |logit diff| on the prompts and the greedy tokens' agreement
    (within `limits`, by default the runtime tolerances: float32 both)."""
    limits = limits or RUNTIME_TOLERANCES
    limit = limits["max_abs_logit_diff"]
    ours = [_forward(model, seq) for seq in ids]
    diffs = [float((a - theirs[f"logits.{i}"].double()).abs().max()) for i, a in enumerate(ours)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    report.add(
        "runtimes",
        f"{name}: max_abs_logit_diff",
        diffs[worst] <= limit,
        figure=diffs[worst],
        threshold=limit,
        detail=f"worst: prompt {worst}" + ("; float32 both" if limits is RUNTIME_TOLERANCES else ""),
    )
    share, first = _greedy_share(model, ids, theirs, new_tokens, tie=2 * limit)
    report.add(
        "runtimes",
        f"{name}: greedy_match",
        share >= limits["greedy_match"],
        figure=share,
        threshold=limits["greedy_match"],
        detail=first or f"share of prompts whose {new_tokens} greedy tokens agree (up to a tie)",
    )
