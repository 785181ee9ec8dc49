"""Human-readable renderings of a plan (the CLI prints them; no click here)."""

from __future__ import annotations

from mergekit_lite.io.format import DTYPE_NAMES
from mergekit_lite.plan.plan import Op, Plan
from mergekit_lite.plan.serving import lint_lines
from mergekit_lite.sizes import human_bytes


def describe_op(op: Op) -> str:
    """A short label such as `a0 lora x2.000` or `a1 replace`."""
    tag = f"a{op.adapter}"
    if op.kind == "delta":
        name = {"bias": "lora_bias", "embedding": "lora_emb", "conv1d": "lora_conv1d"}.get(op.layout, "lora")
        if op.experts:  # ParamWrapper on experts: all of them (a fused tensor), or one expert's block
            name = f"lora_experts[{op.experts}]" if op.expert < 0 else f"lora_expert[{op.expert}/{op.experts}]"
        return f"{tag} {name} x{op.scale:.4g}"
    if op.kind == "dora":
        return f"{tag} dora x{op.scale:.4g}"
    if op.kind == "rows":
        return f"{tag} rows[{len(op.indices)}]"
    return f"{tag} {op.kind}"


def plan_table(plan: Plan, limit: int | None = None) -> str:
    """The plan as text: a summary, the adapters, and one row per changed tensor."""
    changed = [t for t in plan.tensors if t.changed]
    lines = [f"base      {plan.base}"]
    if plan.base_quantization:
        lines.append(f"          {plan.base_quantization}: merged into the dequantized weights")
    fp8 = [t for t in plan.tensors if t.fp8_block]
    if fp8:
        blocks = ", ".join(sorted({f"{t.fp8_block[0]}x{t.fp8_block[1]}" for t in fp8}))
        lines.append(
            f"release   fine-grained FP8: {len(fp8)} weights in {blocks} blocks, {sum(1 for t in fp8 if not t.part)} "
            "quantized from the merge, the rest copied; config.json `quantization_config.quant_method: fp8`"
        )
    for a in plan.adapters:
        lines.append(
            f"adapter {a['index']} {a['path']}  ({a['variant']}, r={a['r']}, alpha={a['lora_alpha']}, "
            f"weight={a['weight']:g}, {a['tensors']} tensors)"
        )
    if plan.combine is not None:
        params = ", ".join(f"{k}={v}" for k, v in plan.combine.summary().items() if k != "method" and v is not None)
        lines.append(
            f"adapter {plan.combine.index} = `{plan.combine.method}` of the adapters above ({params}), "
            "as PEFT's add_weighted_adapter"
        )
    dtypes = sorted({DTYPE_NAMES.get(t.dtype, t.dtype) for t in plan.tensors})
    tie = (
        "tied"
        if plan.tied_out
        else ("untied (the adapters change lm_head or the embedding)" if plan.tied_in else "untied")
    )
    lines += [
        f"output    {len(plan.tensors)} tensors ({len(changed)} changed), {', '.join(dtypes)}, "
        f"{len(plan.shard_names)} shard{'s' if len(plan.shard_names) > 1 else ''}, {human_bytes(plan.total_bytes)}",
        f"embedding {tie}" + (f", {plan.embedding_rows} rows" if plan.embedding_rows else ""),
        f"memory    merge buffers up to {human_bytes(plan.peak_bytes)} (the tensor in hand, the reused row-block "
        "and output buffers, the writes in flight), on top of the process itself",
        *lint_lines(plan.serving),
        "",
    ]
    rows = [("tensor", "shape", "dtype", "operations")]
    shown = changed if limit is None else changed[:limit]
    for t in shown:
        rows.append(
            (t.name, "x".join(map(str, t.shape)), DTYPE_NAMES.get(t.dtype, t.dtype), ", ".join(map(describe_op, t.ops)))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
    if len(shown) < len(changed):
        lines.append(f"... and {len(changed) - len(shown)} more changed tensors (--all to list them)")
    return "\n".join(lines)
