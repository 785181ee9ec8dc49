"""Gate check 6, GGUF (with `output.gguf`): the GGUF file made from the verified release is that release.

The file is read back by transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`, which
dequantizes with the `gguf` package and undoes llama.cpp's layout, e.g. the q/k row permutation): a
reader of its own, not the converter that wrote it. Three rows:

- every tensor is the release's: bit for bit for `bf16` and `f32`, the release's value rounded to
  float16 for `f16` (tensors the converter keeps in float32, such as norms, bit for bit), and for
  `q8_0` within its quantization bound: each element at most 0.57 of its 32-element block's
  max |w| / 127 from the release's (half a step, plus the float16 rounding of the block's scale,
  127 x 2^-11 of a step);
- max |logit diff| and greedy tokens on the gate's prompts, both models in float32, against the
  release loaded with transformers (a divergence at a near-tie counts as agreement, as in the
  end-to-end check): runtime tolerances for the lossless outtypes, the bfloat16 table for `q8_0`;
- the file's metadata names the release and its base model (`general.name`, `general.base_model.*`).

This does not run llama.cpp itself (its C++ runtime is not built here); the tensors checked are
what llama.cpp's loader reads, by the same GGUF format.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.gate.endtoend import _agrees, _forward, _generate, prompt_ids
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.tolerances import RUNTIME_TOLERANCES, TOLERANCES

Q8_BLOCK = 32
Q8_BOUND = 0.57  # of a block's max |w| / 127: half a step, plus 127 x 2^-11 of one (the scale in float16)


@dataclass(frozen=True)
class GgufFile:
    """The GGUF file of a release: its name in the folder, the converter's outtype, and the name and
    base model its metadata must give."""

    name: str
    outtype: str
    model_name: str
    base_model: str | None


def check_gguf(
    report: GateReport, candidate: Path, gguf: GgufFile, tokenizer: Any, prompts: list[str] | None, new_tokens: int
) -> None:
    """Record the GGUF rows for `candidate / gguf.name`."""
    from transformers import AutoModelForCausalLM

    path = candidate / gguf.name
    if not path.is_file():
        report.add("gguf", "every tensor is the release's", False, figure=1, threshold=0, detail=f"no `{gguf.name}`")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        release = AutoModelForCausalLM.from_pretrained(candidate, dtype=torch.float32).eval()
        loaded = AutoModelForCausalLM.from_pretrained(candidate, gguf_file=gguf.name, dtype=torch.float32).eval()
    _tensors(report, release, loaded, gguf.outtype)
    _outputs(report, release, loaded, gguf.outtype, tokenizer, prompts, new_tokens)
    _metadata(report, path, gguf.model_name, gguf.base_model)


def _tensors(report: GateReport, release, loaded, outtype: str) -> None:
    ours, theirs = release.state_dict(), loaded.state_dict()
    problems = [f"`{n}` missing from the GGUF" for n in ours if n not in theirs]
    problems += [f"`{n}` not in the release" for n in theirs if n not in ours]
    for name, w in ours.items():
        g = theirs.get(name)
        if g is None:
            continue
        if g.shape != w.shape:
            problems.append(f"`{name}` is {tuple(g.shape)}, the release's {tuple(w.shape)}")
        elif not _matches(w, g, outtype):
            worst = int((g - w).abs().argmax())
            problems.append(
                f"`{name}`: element {worst} is {float(g.view(-1)[worst]):.6g}, the release's "
                f"{float(w.view(-1)[worst]):.6g}"
            )
    rule = {"bf16": "bit for bit", "f32": "bit for bit", "f16": "the release's rounded to float16"}
    report.add(
        "gguf",
        "every tensor is the release's",
        not problems,
        figure=len(problems),
        threshold=0,
        detail="; ".join(problems[:3])
        if problems
        else f"{len(ours)} tensors, "
        + rule.get(outtype, f"within q8_0's bound ({Q8_BOUND} of a block's max |w| / 127)"),
    )


def _matches(w: torch.Tensor, g: torch.Tensor, outtype: str) -> bool:
    """Whether the GGUF's tensor `g` is what `outtype` makes of the release's `w` (both float32)."""
    if torch.equal(w, g):
        return True
    if outtype == "f16":
        return torch.equal(w.to(torch.float16).to(torch.float32), g)
    if outtype == "q8_0" and w.dim() >= 1 and w.shape[-1] % Q8_BLOCK == 0:
        blocks = w.reshape(-1, Q8_BLOCK)
        bound = blocks.abs().amax(dim=1, keepdim=True) / 127 * Q8_BOUND
        return bool(((g.reshape(-1, Q8_BLOCK) - blocks).abs() <= bound).all())
    return False


def _outputs(report: GateReport, release, loaded, outtype: str, tokenizer, prompts, new_tokens: int) -> None:
    limits = (
        dict(RUNTIME_TOLERANCES)
        if outtype != "q8_0"
        else {m: TOLERANCES["BF16"][m] for m in ("max_abs_logit_diff", "greedy_match")}
    )
    vocab = release.get_input_embeddings().weight.shape[0]
    ids, _ = prompt_ids(tokenizer, prompts, vocab)
    diffs, same, first = [], 0, ""
    tie = 2 * RUNTIME_TOLERANCES["max_abs_logit_diff"]
    for i, seq in enumerate(ids):
        ref = _forward(release, seq)
        diffs.append(float((ref - _forward(loaded, seq)).abs().max()))
        a, b = _generate(release, seq, new_tokens), _generate(loaded, seq, new_tokens)
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            same += 1
            continue
        prefix = torch.cat([seq, torch.tensor(a[:k], dtype=seq.dtype)])
        if bool(_agrees(_forward(release, prefix)[-1], torch.tensor(b[k]), tie)):
            same += 1
        else:
            first = first or f"prompt {i} differs at token {k}"
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    report.add(
        "gguf",
        "max_abs_logit_diff",
        diffs[worst] <= limits["max_abs_logit_diff"],
        figure=diffs[worst],
        threshold=limits["max_abs_logit_diff"],
        detail=f"worst: prompt {worst}; float32 both, the GGUF read by transformers",
    )
    share = same / len(ids) if ids else 1.0
    report.add(
        "gguf",
        "greedy_match",
        share >= limits["greedy_match"],
        figure=share,
        threshold=limits["greedy_match"],
        detail=first or f"share of prompts whose {new_tokens} greedy tokens agree (up to a tie)",
    )


def _metadata(report: GateReport, path: Path, name: str, base: str | None) -> None:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def text(key: str) -> str | None:
        field = fields.get(key)
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8", "replace")

    problems = []
    if text("general.name") != name:
        problems.append(f"general.name is {text('general.name')!r}, not {name!r}")
    if base and text("general.base_model.0.name") != base:
        problems.append(f"general.base_model.0.name is {text('general.base_model.0.name')!r}, not {base!r}")
    report.add(
        "gguf",
        "metadata names the release and its base",
        not problems,
        figure=len(problems),
        threshold=0,
        detail="; ".join(problems) or f"general.name {name!r}" + (f", base model {base!r}" if base else ""),
    )
