"""The release's model card (README.md): provenance, adapters, dtype, the gate's figures."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mergekit_lite._version import __version__
from mergekit_lite.plan.plan import Plan
from mergekit_lite.release.receipt import plan_summary


def _combine_line(combine: dict[str, Any]) -> str:
    """How the adapters were combined, in words, for the model card."""
    if combine["method"] == "sum":
        return "`sum` (each adapter's weighted delta added to the base)"
    params = ", ".join(f"{k}={v}" for k, v in combine.items() if k != "method" and v is not None)
    return f"`{combine['method']}` ({params}), as PEFT's `add_weighted_adapter` then `merge_and_unload`"


def model_card(
    name: str,
    plan: Plan,
    *,
    base: Path,
    base_id: str | None,
    adapters: list[dict[str, Any]],
    gate_markdown: str | None,
    skipped_because: str = "--no-verify",
    base_revision: str | None = None,
    tokenizer: str = "",
    manifest_license: str | None = None,
    evaluation: dict[str, Any] | None = None,
) -> str:
    """README.md: front matter a hub accepts, provenance, adapters, dtype, tokenizer, usage, the gate.

    No path of the build machine appears: a local base or adapter is named by its folder's name.
    `base_id` (a hub repository id; for a local base, the hub id its config names, if any) goes into
    the front matter's `base_model`, `base_revision` (its resolved commit) into the text; `manifest_license` is used when the base has none (its card's or config's `license`); `tokenizer` says which source's
    tokenizer was shipped. `evaluation` (the gate's `eval` context: `verify.eval`'s figures) adds the
    base's, base + adapters' and the release's perplexity on the user's data.
    """
    base_model = base_id or hub_id_of(base)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if base_model:
        front.append(f"base_model: {base_model}")
    found = base_license(base) or manifest_license
    if found:
        front.append(f"license: {found}")
    front += ["tags:", "- mergekit-lite", "- lora", "- merge"]
    front += ["- not-verified"] if gate_markdown is None else []
    front.append("---")
    adapters = [dict(a, path=_shown(str(a["path"]))) for a in adapters]
    rows = ["| # | adapter | variant | r | alpha | weight | targets |", "|---|---|---|---|---|---|---|"]
    for a in adapters:
        targets = a["target_modules"]
        targets = ", ".join(targets) if isinstance(targets, list) else str(targets)
        rows.append(
            f"| {a['index']} | `{a['path']}` | {a['variant']} | {a['r']} | {a['lora_alpha']} | {a['weight']:g} | {targets} |"
        )
    summary = plan_summary(plan)
    pinned = f" (commit `{base_revision}`)" if base_id and base_revision else ""
    body = [
        f"# {name}",
        "",
        f"Base model `{base_id or base.name}`{pinned}{'' if base_id else ' (a local folder)'} with {len(adapters)} LoRA adapter{'s' if len(adapters) > 1 else ''} merged "
        f"by mergekit-lite {__version__}.",
        "",
        *rows,
        "",
        f"- dtype: {', '.join(summary['dtypes'])}",
        f"- tensors: {summary['tensors']} ({summary['changed_tensors']} changed by the adapters), "
        f"{len(summary['shards'])} shard(s), {summary['total_size']} bytes",
        f"- tied embeddings: base {plan.tied_in}, release {plan.tied_out}",
        *(
            [f"- merged into: the base's dequantized weights ({plan.base_quantization})"]
            if plan.base_quantization
            else []
        ),
        *([_fp8_line(plan)] if plan.quantization_config is not None else []),
        f"- adapters combined: {_combine_line(summary['combine'])}",
        f"- tokenizer: {tokenizer or 'none shipped'}",
        "",
        *_usage(name, shipped=bool(tokenizer) and not tokenizer.startswith("none")),
        "",
        *(_evaluation(evaluation) if evaluation else []),
        gate_markdown
        or f"### NOT VERIFIED\n\nThis release was published with the verification gate skipped ({skipped_because}).\n",
        "Files: `release.json` records the SHA-256 of every input and output file and the library versions; "
        "`SHA256SUMS` checks with `sha256sum -c SHA256SUMS`; `manifest.yaml` is the manifest as run.",
    ]
    return "\n".join(front + [""] + body) + "\n"


def _evaluation(found: dict[str, Any]) -> list[str]:
    """The perplexities the gate measured on `verify.eval`'s data: the adapters' effect and the release's."""
    ppl, loss = found["perplexity"], found["mean_token_loss"]
    rows = [("base", "base"), ("base + adapters (PEFT, unmerged)", "base_plus_adapters"), ("this release", "release")]
    return [
        "## Evaluation on your data",
        "",
        f"Next-token loss on `{found['file']}` ({found['scored_records']} records, {found['scored_tokens']} tokens "
        "scored), measured by the gate in float32:",
        "",
        "| model | mean token loss | perplexity |",
        "|---|---|---|",
        *(f"| {label} | {loss[key]:.4f} | {ppl[key]:.4f} |" for label, key in rows),
        "",
    ]


def _shown(path: str) -> str:
    """An adapter as the card names it: a hub `id@commit` as is, a local folder by its name."""
    return path if "@" in path and not Path(path).exists() else Path(path).name


def hub_id_of(base: Path) -> str | None:
    """The hub repository a local base came from, when its config.json names one (`_name_or_path`)."""
    try:
        named = json.loads((base / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(named, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", named) and not Path(named).exists():
        return named
    return None


def base_license(base: Path) -> str | None:
    """The base's license: its model card's front matter `license:`, else its config.json's `license`."""
    try:
        card = (base / "README.md").read_text(encoding="utf-8")
    except (OSError, ValueError):
        card = ""
    if card.startswith("---"):
        for line in card.split("\n")[1:]:
            if line.strip() == "---":
                break
            key, _, value = line.partition(":")
            if key.strip() == "license" and value.strip():
                return value.strip().strip("'\"")
    try:
        value = json.loads((base / "config.json").read_text(encoding="utf-8")).get("license")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _usage(name: str, shipped: bool) -> list[str]:
    """How to load the release with transformers and serve it with vLLM."""
    where = f"./{name}"
    tokenizer = "" if shipped else "  # no tokenizer ships with this release: load the base's"
    return [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{where}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}"){tokenizer}',
        "```",
        "",
        "```sh",
        f"vllm serve {where}" + ("" if shipped else " --tokenizer <the base's tokenizer>"),
        "```",
    ]


def _fp8_line(plan: Plan) -> str:
    """What `dtype: float8_e4m3fn` wrote: which tensors are FP8, and which of them were re-quantized."""
    fp8 = [t for t in plan.tensors if t.fp8_block]
    blocks = sorted({f"{t.fp8_block[0]}x{t.fp8_block[1]}" for t in fp8})
    recomputed = sum(1 for t in fp8 if not t.part)
    return (
        f"- written as: fine-grained FP8 (float8_e4m3fn, {', '.join(blocks)} block scales `weight_scale_inv`) for "
        f"{len(fp8)} weights, {recomputed} of them re-quantized from the merge, the rest the base's bytes; "
        "config.json's `quantization_config` says so (`quant_method: fp8`)"
    )
