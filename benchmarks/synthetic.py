"""Synthetic Llama-style bf16 checkpoints of a chosen size, with a rank-16 LoRA on every linear layer.

Written straight to safetensors (no model object in memory), with a real config.json and a real
adapter_config.json, so `mergekit-lite` and transformers read them like any checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 4
LINEAR = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "self_attn.v_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def layer_bytes() -> int:
    return 2 * (sum(o * i for o, i in LINEAR.values()) + 2 * HIDDEN)


def layers_for(gigabytes: float) -> int:
    """How many decoder layers make a bf16 checkpoint of about this many GB."""
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    return max(1, round((gigabytes * 1e9 - fixed) / layer_bytes()))


def build(folder: Path, gigabytes: float, rank: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """Build (once) a base checkpoint of ~`gigabytes` GB and its LoRA adapter under `folder`."""
    base, adapter = folder / "base", folder / "adapter"
    if (base / "config.json").exists() and (adapter / "adapter_config.json").exists():
        return base, adapter
    n = layers_for(gigabytes)
    gen = torch.Generator().manual_seed(seed)
    base.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0

    def add(name: str, shape: tuple[int, ...]) -> None:
        nonlocal shard_bytes
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if shard_bytes + t.nbytes > 2e9 and shards[-1]:
            _flush(base, shards, weight_map)
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = t
        shard_bytes += t.nbytes

    add("model.embed_tokens.weight", (VOCAB, HIDDEN))
    for i in range(n):
        add(f"model.layers.{i}.input_layernorm.weight", (HIDDEN,))
        add(f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,))
        for module, shape in LINEAR.items():
            add(f"model.layers.{i}.{module}.weight", shape)
    add("model.norm.weight", (HIDDEN,))
    add("lm_head.weight", (VOCAB, HIDDEN))
    _flush(base, shards, weight_map, final=True)
    (base / "config.json").write_text(json.dumps(_config(n), indent=2))

    adapter.mkdir(parents=True, exist_ok=True)
    factors = {}
    for i in range(n):
        for module, (out_features, in_features) in LINEAR.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            factors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * 0.01
            factors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.01
    save_file(factors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": sorted({m.split(".")[-1] for m in LINEAR}),
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "init_lora_weights": True,
            },
            indent=2,
        )
    )
    return base, adapter


def _flush(base: Path, shards: list[dict[str, torch.Tensor]], weight_map: dict[str, str], final: bool = False) -> None:
    """Write the newest shard under a temporary name; on the final flush, rename all with HF names."""
    index = len(shards)
    name = f"part-{index:05d}.safetensors"
    save_file(shards[-1], base / name, metadata={"format": "pt"})
    for key in shards[-1]:
        weight_map[key] = name
    shards[-1].clear()
    if not final:
        return
    total = sum(1 for _ in base.glob("part-*.safetensors"))
    renames = {f"part-{i:05d}.safetensors": f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)}
    for old, new in renames.items():
        (base / old).rename(base / new)
    size = sum((base / n).stat().st_size for n in renames.values())
    (base / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": size},
                "weight_map": {k: renames[v] for k, v in weight_map.items()},
            },
            indent=2,
        )
    )


def _config(layers: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "hidden_act": "silu",
    }


if __name__ == "__main__":  # python benchmarks/synthetic.py FOLDER GIGABYTES
    import sys

    build(Path(sys.argv[1]), float(sys.argv[2]))
