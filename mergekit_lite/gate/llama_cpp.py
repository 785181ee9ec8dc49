"""Gate check 5, runtimes: `llama.cpp`, the release in llama.cpp's own C++ runtime.

The release is converted to GGUF (float32) by llama.cpp's own `convert_hf_to_gguf.py` (the one
`output.gguf` uses, found the same way), into a temporary folder, and that file is run by llama.cpp
through llama-cpp-python (`llama_cpp.Llama`, CPU, its KV cache in float32) in a worker process of its
own (gate/llama_cpp_worker.py: a crash in the C++ runtime fails this check, not the merge). The
prompts are tokenized by transformers and fed as token ids, so a tokenizer difference cannot hide a
difference in the math. Rows, against transformers 5 in float32 (gate/runtimes.py's comparison, near
ties as there):

- `llama.cpp: max_abs_logit_diff` and `llama.cpp: greedy_match`;
- `llama.cpp: stops where transformers does`: every end-of-sequence id of the release's
  generation_config (where transformers stops) is one llama.cpp ends a generation at (its EOG ids,
  from the GGUF's tokenizer metadata), and llama.cpp ends at no other token that is text (a control
  token such as `<|endoftext|>` is allowed: it ends a generation in both);
- with `output.gguf`, the shipped file too, run with llama.cpp's defaults (a float16 KV cache):
  `llama.cpp, <file>: max_abs_logit_diff` and `greedy_match`, within the runtime tolerances for an
  `f32` file and the bfloat16 table for `bf16`, `f16` and `q8_0` (llama.cpp computes in the file's
  precision).

What llama.cpp reads differently from transformers: the converter reads the config through
`AutoConfig` and takes the RoPE values from `rope_parameters` first (conversion/base.py), under
transformers 4.57 as under 5, so a RoPE value changed in the transformers 4 layout only does not
reach the GGUF (the transformers4 runtime and the packaging check see that one); the tokenizer's
end-of-sequence tokens (tokenizer_config.json, tokenizer.json) it does read on its own, and a BPE
pre-tokenizer it does not know it refuses (the check fails with the converter's line).

llama-cpp-python is found in $MERGEKIT_LITE_LLAMA_CPP_PYTHON (a folder holding `llama_cpp`, e.g. a
`pip install --target` folder), else installed in this Python, else in the build `make runtimes`
caches: ${XDG_CACHE_HOME:-~/.cache}/mergekit-lite/runtimes/llama-cpp-python-<version>-py<X.Y>/site.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import InputError
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.runtimes import _compare, _release_and_prompts
from mergekit_lite.gate.tolerances import RUNTIME_TOLERANCES, TOLERANCES
from mergekit_lite.sources.llama_cpp import run_converter

ENV = "MERGEKIT_LITE_LLAMA_CPP_PYTHON"
VERSION = "0.3.36"  # what `make runtimes` builds (the Makefile's LLAMA_CPP_VERSION)
WORKER = Path(__file__).with_name("llama_cpp_worker.py")
THREADS = max(1, min(4, os.cpu_count() or 1))
TIMEOUT_S = 3600


@dataclass(frozen=True)
class LlamaCpp:
    """llama.cpp for the check: its converter script, the folder holding llama-cpp-python's
    `llama_cpp` package (first on the worker's path) and that package's version."""

    converter: Path
    site: Path
    version: str


def cached_build() -> Path:
    """Where `make runtimes` installs llama-cpp-python (the folder holding `llama_cpp`)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    python = f"py{sys.version_info[0]}.{sys.version_info[1]}"
    return cache / "mergekit-lite" / "runtimes" / f"llama-cpp-python-{VERSION}-{python}" / "site"


def find_llama_cpp(converter: Path) -> LlamaCpp:
    """llama-cpp-python where the module's docstring says, with `converter`; an InputError naming
    what to install when it is nowhere."""
    how = (
        f"`pip install 'mergekit-lite[llama-cpp]'` (llama-cpp-python), or `make runtimes` (builds it into "
        f"{cached_build()}), or set ${ENV} to a folder that holds `llama_cpp`"
    )
    if os.environ.get(ENV):
        site = Path(os.environ[ENV]).expanduser().absolute()
        if not (site / "llama_cpp" / "__init__.py").is_file():
            raise InputError(f"`verify.runtimes: [llama.cpp]`: no `llama_cpp` in `{site}` (${ENV}); {how}")
    elif (spec := importlib.util.find_spec("llama_cpp")) is not None and spec.origin:
        site = Path(spec.origin).parent.parent
    elif (cached_build() / "llama_cpp" / "__init__.py").is_file():
        site = cached_build()
    else:
        raise InputError(f"`verify.runtimes: [llama.cpp]`: llama-cpp-python is not installed; {how}")
    found = re.search(r'__version__\s*=\s*"([^"]+)"', (site / "llama_cpp" / "__init__.py").read_text("utf-8"))
    return LlamaCpp(converter, site, found.group(1) if found else "unknown")


def check_llama_cpp(
    report: GateReport,
    candidate: Path,
    tokenizer: Any,
    prompts: list[str] | None,
    new_tokens: int,
    llama_cpp: LlamaCpp | None,
    shipped: tuple[str, str] | None = None,
) -> None:
    """Record the llama.cpp rows for `candidate` (its packaged `tokenizer`, or None); `shipped` is the
    release's own GGUF file and outtype (`output.gguf`), checked too."""
    if llama_cpp is None:
        raise RuntimeError("llama.cpp was not looked for (the plan finds it for `verify.runtimes: [llama.cpp]`)")
    model, ids, how = _release_and_prompts(candidate, tokenizer, prompts)
    eos = model.generation_config.eos_token_id
    stops = [eos] if isinstance(eos, int) else [int(i) for i in eos or []]
    with tempfile.TemporaryDirectory(prefix="mergekit-llama-cpp-") as tmp:
        converted = _convert(llama_cpp.converter, candidate, Path(tmp) / "release-F32.gguf")
        theirs = _run_worker(llama_cpp, converted, ids, new_tokens, stops, f32_cache=True)
    report.context.setdefault("runtimes", {})["llama.cpp"] = {
        "llama-cpp-python": llama_cpp.version,
        "converter": str(llama_cpp.converter),
        "gguf": "f32, converted by the check; KV cache float32",
        "prompts": how,
    }
    _compare(report, "llama.cpp", model, ids, theirs, new_tokens)
    _stops(report, tokenizer, stops, theirs)
    if shipped is not None:
        name, outtype = shipped
        if not (candidate / name).is_file():
            raise RuntimeError(f"`output.gguf`: no `{name}` in the release")
        theirs = _run_worker(llama_cpp, candidate / name, ids, new_tokens, stops, f32_cache=False)
        limits = dict(RUNTIME_TOLERANCES) if outtype == "f32" else TOLERANCES["BF16"]
        report.context["runtimes"]["llama.cpp"]["shipped"] = f"{name}, llama.cpp's default KV cache (float16)"
        _compare(report, f"llama.cpp, {name}", model, ids, theirs, new_tokens, limits=limits)


def _convert(script: Path, folder: Path, out: Path) -> Path:
    """`folder` converted to a float32 GGUF file `out` by llama.cpp's converter, as users run it."""
    failed = run_converter(script, folder, out, ["--outtype", "f32"], cwd=out.parent)
    if failed is not None:
        raise RuntimeError(f"llama.cpp's {script.name} could not convert the release: {failed}")
    return out


def _run_worker(
    llama_cpp: LlamaCpp, gguf: Path, ids: list[torch.Tensor], new_tokens: int, stops: list[int], f32_cache: bool
) -> dict[str, torch.Tensor]:
    """The worker's tensors for `gguf`; a failed run raises (the group fails, saying why)."""
    from safetensors import safe_open

    request = {
        "site": str(llama_cpp.site),
        "gguf": str(gguf),
        "ids": [seq.tolist() for seq in ids],
        "new_tokens": new_tokens,
        "suppress": stops,
        "threads": THREADS,
        "f32_cache": f32_cache,
    }
    with tempfile.TemporaryDirectory(prefix="mergekit-llama-cpp-run-") as tmp:
        (Path(tmp) / "request.json").write_text(json.dumps(request), encoding="utf-8")
        out = Path(tmp) / "out.safetensors"
        # -I: neither PYTHONPATH nor the script's folder (gate/packaging.py would shadow `packaging`) on its path
        run = subprocess.run(
            [sys.executable, "-I", str(WORKER), str(Path(tmp) / "request.json"), str(out)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        if run.returncode != 0 or not out.is_file():
            lines = [line for line in run.stderr.splitlines() if line.strip()]
            last = lines[-1].strip() if lines else f"exit status {run.returncode}"
            raise RuntimeError(f"llama.cpp could not run `{gguf.name}`: {last}")
        with safe_open(str(out), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}


def _stops(report: GateReport, tokenizer: Any, stops: list[int], theirs: dict[str, torch.Tensor]) -> None:
    """The row `llama.cpp: stops where transformers does` (see the module's docstring)."""
    eog, control = theirs["eog"].tolist(), theirs["eog_control"].tolist()

    def said(tokens: list[int]) -> str:
        names = tokenizer.convert_ids_to_tokens(tokens) if tokenizer is not None else [""] * len(tokens)
        return ", ".join(f"{t} {n!r}" if n else str(t) for t, n in zip(tokens, names)) or "none"

    missing = [t for t in stops if t not in eog]
    text = [t for t, c in zip(eog, control) if t not in stops and not c]
    problems = []
    if missing:
        problems.append(f"transformers stops at {said(missing)} (generation_config.json), llama.cpp does not")
    if text:
        problems.append(f"llama.cpp also stops at {said(text)}, a text token")
    report.add(
        "runtimes",
        "llama.cpp: stops where transformers does",
        not problems,
        figure=len(missing) + len(text),
        threshold=0,
        detail="; ".join(problems) or f"transformers stops at {said(stops)}; llama.cpp at {said(eog)}",
    )
