"""The release's model card (README.md): provenance, adapters, dtype, the gate's figures."""

from __future__ import annotations

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
) -> str:
    """README.md: provenance, adapters, dtype, the gate's figures, the tool's version.

    `base_id` (a hub repository id) goes into the front matter's `base_model`; `base_revision`
    (its resolved commit) into the text.
    """
    front = ["---", "library_name: transformers", "tags:", "- mergekit-lite", "- lora", "- merge"]
    if base_id:
        front.append(f"base_model: {base_id}")
    front.append("---")
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
        f"Base model `{base_id or base}`{pinned} with {len(adapters)} LoRA adapter{'s' if len(adapters) > 1 else ''} merged "
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
        f"- adapters combined: {_combine_line(summary['combine'])}",
        "",
        gate_markdown
        or f"### NOT VERIFIED\n\nThis release was published with the verification gate skipped ({skipped_because}).\n",
        "Files: `release.json` records the SHA-256 of every input and output file and the library versions; "
        "`SHA256SUMS` checks with `sha256sum -c SHA256SUMS`; `manifest.yaml` is the manifest as run.",
    ]
    return "\n".join(front + [""] + body) + "\n"
