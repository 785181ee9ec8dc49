"""The files that travel with the weights: config.json (reconciled), generation_config.json, index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergekit_lite.plan import Plan
from mergekit_lite.tokenizer import generation_config

TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def reconciled_config(base_config: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The base config with dtype, vocab_size and tie_word_embeddings made true of the output tensors."""
    config = dict(base_config)
    config.pop("quantization_config", None)
    floats = [t.dtype for t in plan.tensors if t.dtype in TORCH_NAMES]
    if floats:
        dtype = TORCH_NAMES[max(set(floats), key=lambda d: sum(t.nbytes for t in plan.tensors if t.dtype == d))]
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    if plan.embedding_rows is not None and "vocab_size" in config:
        config["vocab_size"] = plan.embedding_rows
    if plan.tied_in or "tie_word_embeddings" in config:
        config["tie_word_embeddings"] = plan.tied_out
    return config


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON the way transformers does (indent 2, sorted where it sorts, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_index(folder: Path, plan: Plan) -> None:
    """model.safetensors.index.json for a sharded output; `total_size` is the exact tensor byte count."""
    if len(plan.shard_names) == 1:
        return
    weight_map = {t.name: plan.shard_names[t.shard] for t in sorted(plan.tensors, key=lambda t: t.name)}
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map})


def write_configs(folder: Path, base: Path, base_config: dict[str, Any], plan: Plan, tokenizer: Any = None) -> None:
    """config.json reconciled with the output; generation_config.json carried over with the tokenizer's EOS."""
    write_json(folder / "config.json", reconciled_config(base_config, plan))
    generation = generation_config(base, tokenizer)
    if generation is not None:
        write_json(folder / "generation_config.json", generation)
