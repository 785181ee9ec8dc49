"""The serving lint: could vLLM, SGLang or TGI serve each adapter unmerged, as PEFT runs it?

Read from the adapter's config and tensor keys only (no tensor data), against the one table of
documented limits in serving_limits.py. Each verdict is `yes`, `needs <flag> N` (a rank above the
runtime's default), `no` (refused, or parts of the adapter silently left out: merging is then the
only way to deploy it) or `unknown` (the runtime documents nothing about a feature it uses).
"""

from __future__ import annotations

from typing import Any

from mergekit_lite.plan.serving_limits import FEATURES, MODULES, RANKS, RUNTIMES, Feature, Runtime
from mergekit_lite.sources.adapter import Adapter

_KINDS: dict[str, Feature] = {
    "magnitude": "dora",
    "replace": "modules_to_save",
    "tokens": "trainable_tokens",
    "lora_bias": "lora_bias",
    "emb_A": "embedding_lora",
}


def adapter_features(adapter: Adapter) -> tuple[set[Feature], int, set[str]]:
    """The features an adapter uses, its largest rank, and the leaf names of its LoRA modules."""
    features: set[Feature] = {_KINDS[k.kind] for k in adapter.keys if k.kind in _KINDS}
    rank, modules = 0, set()
    for key in adapter.keys:
        if key.kind in ("lora_A", "emb_A"):
            leaf = key.module.rsplit(".", 1)[-1]
            modules.add(leaf)
            rank = max(rank, key.entry.shape[0])
            if key.kind == "lora_A" and leaf == "lm_head":
                features.add("lm_head_lora")
    return features, rank, modules - {"lm_head", "embed_tokens", "wte", "embed_in"}


def serving_lint(adapters: list[Adapter]) -> list[dict[str, Any]]:
    """Per adapter: its rank, features and target modules, and per runtime a verdict with its reasons."""
    out = []
    for adapter in adapters:
        features, rank, modules = adapter_features(adapter)
        verdicts = {runtime: verdict(runtime, features, rank, modules) for runtime in RUNTIMES}
        out.append(
            {
                "adapter": adapter.index,
                "rank": rank,
                "features": sorted(features),
                "modules": sorted(modules),
                "runtimes": verdicts,
            }
        )
    return out


def verdict(runtime: Runtime, features: set[Feature], rank: int, modules: set[str]) -> dict[str, Any]:
    """One runtime's verdict on one adapter, and its reasons (each with the row's source)."""
    refused: list[dict[str, str]] = []
    unknown: list[dict[str, str]] = []
    for limit in FEATURES:
        if limit.runtime == runtime and limit.feature in features and limit.serves is not True:
            reason = {"reason": f"{limit.feature}: {limit.how}", "source": limit.source}
            (refused if limit.serves is False else unknown).append(reason)
    for limit in MODULES:
        if limit.runtime == runtime and limit.modules is not None and (outside := sorted(modules - limit.modules)):
            refused.append(
                {"reason": f"target modules {', '.join(outside)}: {limit.otherwise}", "source": limit.source}
            )
    needs: list[dict[str, str]] = []
    for limit in RANKS:
        if limit.runtime != runtime or limit.default is None or rank <= limit.default:
            continue
        fits = [c for c in limit.choices or (rank,) if c >= rank]
        if not fits:
            refused.append({"reason": f"rank {rank}: above the largest {limit.flag}", "source": limit.source})
        else:
            needs.append(
                {"reason": f"rank {rank} > default {limit.default}: {limit.flag} {fits[0]}", "source": limit.source}
            )
    if refused:
        verdict = "no"
    elif unknown:
        verdict = "unknown"
    elif needs:
        verdict = "needs " + needs[0]["reason"].rsplit(": ", 1)[1]
    else:
        verdict = "yes"
    return {"verdict": verdict, "reasons": refused + unknown + needs}


def lint_lines(lint: list[dict[str, Any]]) -> list[str]:
    """The lint as text lines for `mergekit-lite plan`: a verdict line per adapter, a line per reason."""
    lines = []
    for row in lint:
        verdicts = "; ".join(f"{name} {v['verdict']}" for name, v in row["runtimes"].items())
        extra = f", {', '.join(row['features'])}" if row["features"] else ""
        lines.append(f"serving   adapter {row['adapter']} unmerged (r={row['rank']}{extra}): {verdicts}")
        for name, v in row["runtimes"].items():
            lines += [f"            {name}: {r['reason']} [{r['source']}]" for r in v["reasons"]]
    return lines
