"""The files that travel with the weights: config.json (reconciled), generation_config.json, index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergekit_lite.plan.compat import portable_config
from mergekit_lite.plan.config import reconciled_config
from mergekit_lite.plan.plan import Plan
from mergekit_lite.release.compat import make_tokenizer_portable


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON the way transformers does (indent 2, sorted where it sorts, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_index(folder: Path, plan: Plan) -> None:
    """model.safetensors.index.json for a sharded output; `total_size` is the exact tensor byte count."""
    if len(plan.shard_names) == 1:
        return
    weight_map = {t.name: plan.shard_names[t.shard] for t in sorted(plan.tensors, key=lambda t: t.name)}
    write_json(
        folder / "model.safetensors.index.json",
        {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map},
    )


def write_configs(
    folder: Path, base: Path, base_config: dict[str, Any], plan: Plan, tokenizer: Any = None, *, compat: bool = True
) -> None:
    """config.json reconciled with the output; generation_config.json carried over with the tokenizer's EOS.

    With `compat` (`output.compat`, the default), config.json and the tokenizer_config.json already
    copied into `folder` are made readable by transformers 4 as well (plan/compat.py).
    """
    config = reconciled_config(base_config, plan)
    write_json(folder / "config.json", portable_config(config) if compat else config)
    if compat:
        make_tokenizer_portable(folder)
    generation = generation_config(base, tokenizer)
    if generation is not None:
        write_json(folder / "generation_config.json", generation)


def generation_config(base: Path, tokenizer: Any) -> dict[str, Any] | None:
    """The base's generation_config.json with the tokenizer's EOS id among its `eos_token_id`s."""
    path = base / "generation_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        current = data.get("eos_token_id")
        ids = [] if current is None else (list(current) if isinstance(current, list) else [current])
        if eos not in ids:
            ids.append(eos)
        data["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    return data
