"""Several adapters combined into one, as PEFT's `add_weighted_adapter` builds it (`combine:` in the manifest).

Plan time, without tensor data: `plan_combine` refuses what PEFT refuses (or would silently get
wrong), then asks PEFT itself, on a meta-device copy of the model, which modules get the combined
adapter, in which order, with which rank and scaling. The result, a CombinePlan (plan.py), is
plain data; merge/combine.py computes its factors when the merge reaches them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import PlanError
from mergekit_lite.manifest.sections import CombineSpec
from mergekit_lite.plan.plan import CombinedInput, CombinedModule, CombinePlan, PlannedTensor
from mergekit_lite.sources.adapter import Adapter
from mergekit_lite.vocabulary import COMBINE_METHODS, LORA_LAYOUTS

COMBINED = "combined"  # the new adapter's name in PEFT
REPLAYED_INITS = (True, False, "gaussian")  # initialisations whose random draws are replayed (and tested) for dare
_UNSUPPORTED = {  # adapter_config.json fields PEFT's add_weighted_adapter does not combine
    "use_dora": "combines the LoRA factors only, not DoRA's magnitude vectors",
    "lora_bias": "does not combine lora_B biases",
    "modules_to_save": "does not combine modules_to_save copies",
    "trainable_token_indices": "does not combine trainable tokens",
}


def plan_combine(
    spec: CombineSpec,
    base: Path,
    adapters: list[Adapter],
    tensors: list[PlannedTensor],
    base_shapes: dict[str, tuple[int, ...]],
) -> CombinePlan | None:
    """The combined adapter for `spec` (None for `sum`), from configs, headers and the finalised
    per-adapter ops; refuses, with a PlanError naming the problem, what PEFT would refuse."""
    if spec.method == "sum":
        return None
    method = spec.method
    effective = "linear" if len(adapters) == 1 else method
    traits = COMBINE_METHODS[effective]
    _refuse_unsupported(method, adapters, tensors, base_shapes)
    ranks = [_max_rank(a) for a in adapters]
    if traits.same_rank and len(set(ranks)) > 1:
        listed = ", ".join(f"adapter {a.index} r={r}" for a, r in zip(adapters, ranks))
        raise PlanError(
            f"`combine: {method}` needs adapters of one rank, as PEFT's add_weighted_adapter does "
            f"({listed}); use `cat`, `svd` or `sum`"
        )
    rank = sum(ranks) if traits.family == "cat" else (spec.svd_rank or max(ranks)) if traits.svd else ranks[0]
    init = adapters[0].config.get("init_lora_weights", True)
    if traits.random and init not in REPLAYED_INITS:
        raise PlanError(
            f"{adapters[0].label}: `init_lora_weights: {init}` is copied to the combined adapter, and "
            f"`combine: {method}` reproduces PEFT's random draws only after the initialisations "
            f"{', '.join(map(str, REPLAYED_INITS))}; put another adapter first"
        )
    layers = peft_layers(base, adapters, rank, _combined_targets(method, adapters))
    uses = _lora_uses(adapters, tensors)
    modules = []
    for layer in layers:
        modules.append(_module(method, effective, layer, uses.pop(layer["module"], None), adapters=adapters, rank=rank))
    if uses:
        module, found = next(iter(uses.items()))
        raise PlanError(
            f"adapter {found[0][1].adapter}: PEFT's add_weighted_adapter would drop its factors for "
            f"`{module}` (the combined adapter takes the first adapter's layers_to_transform, "
            "layers_pattern and exclude_modules); put the adapter with the widest reach first, or use `sum`"
        )
    return CombinePlan(
        method=method,
        effective=effective,
        index=len(adapters),
        rank=rank,
        density=spec.density,
        majority_sign_method=spec.majority_sign_method or "total",
        svd_rank=spec.svd_rank,
        svd_clamp=spec.svd_clamp,
        svd_full_matrices=True if spec.svd_full_matrices is None else spec.svd_full_matrices,
        seed=spec.seed or 0,
        init=init,
        modules=tuple(modules),
    )


def _refuse_unsupported(
    method: str, adapters: list[Adapter], tensors: list[PlannedTensor], base_shapes: dict[str, tuple[int, ...]]
) -> None:
    for adapter in adapters:
        for key, why in _UNSUPPORTED.items():
            if adapter.config.get(key):
                raise PlanError(
                    f"{adapter.label}: `{key}` is set, and PEFT's add_weighted_adapter {why}; "
                    f"`combine: {method}` takes plain LoRA adapters (use `combine: sum`)"
                )
    labels = {a.index: a.label for a in adapters}
    for t in tensors:
        for op in t.ops:
            if op.kind == "delta" and op.layout in LORA_LAYOUTS:
                continue
            if op.kind == "base_layer" and t.shape == base_shapes.get(t.source):
                continue  # PEFT's saved copy of a targeted embedding, equal to the base: checked, not applied
            raise PlanError(
                f"{labels[op.adapter]}: `{op.keys[0]}` changes `{t.name}` outside its LoRA factors "
                f"({op.kind}), which PEFT's add_weighted_adapter does not combine; "
                f"`combine: {method}` takes plain LoRA adapters (use `combine: sum`)"
            )


def _max_rank(adapter: Adapter) -> int:
    """The rank PEFT's add_weighted_adapter counts for an adapter: r, or the largest of rank_pattern."""
    pattern = adapter.config.get("rank_pattern") or {}
    return int(max([adapter.config.get("r", 8), *pattern.values()]))


def _combined_targets(method: str, adapters: list[Adapter]) -> set[str] | str:
    """PEFT's target_modules of the combined adapter: the union of the sets, or the regexes or-ed."""
    targets = [a.config.get("target_modules") for a in adapters]
    for adapter, target in zip(adapters, targets):
        if not target:
            raise PlanError(
                f"{adapter.label}: `combine: {method}` needs `target_modules` in adapter_config.json, "
                "as PEFT's add_weighted_adapter does"
            )
    if all(isinstance(t, list) for t in targets):
        return set().union(*targets)
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    kinds = ", ".join(f"adapter {a.index}: {type(t).__name__}" for a, t in zip(adapters, targets))
    raise PlanError(
        f"`combine: {method}`: the adapters' `target_modules` mix lists and regular expressions ({kinds}), "
        "which PEFT's add_weighted_adapter refuses; use `combine: sum`"
    )


def peft_layers(base: Path, adapters: list[Adapter], rank: int, targets: set[str] | str) -> list[dict[str, Any]]:
    """The layers PEFT gives the combined adapter, in named_modules order, with its own scalings and
    shapes: the base model is built on the meta device from config.json (no weights), the adapters and
    the combined adapter are injected into it as add_weighted_adapter does."""
    import dataclasses
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM

    names = [f"adapter_{a.index}" for a in adapters]
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            configs = [LoraConfig.from_pretrained(str(a.path)) for a in adapters]
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
            peft_model = get_peft_model(model, configs[0], adapter_name=names[0], low_cpu_mem_usage=True)
            for name, config in zip(names[1:], configs[1:]):
                peft_model.add_adapter(name, config, low_cpu_mem_usage=True)
            lora = peft_model.base_model
            lora.peft_config[COMBINED] = dataclasses.replace(
                configs[0], r=rank, lora_alpha=rank, target_modules=targets, alpha_pattern={}, rank_pattern={}
            )
            lora.inject_adapter(lora.model, COMBINED, low_cpu_mem_usage=True)
    except Exception as exc:  # noqa: BLE001  whatever PEFT or transformers refuse here is an input problem
        raise PlanError(
            f"PEFT cannot build the combined adapter on this base: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from None
    layers = []
    for module_name, module in lora.model.named_modules():
        if not isinstance(module, LoraLayer) or not (COMBINED in module.lora_A or COMBINED in module.lora_embedding_A):
            continue
        present = [
            (a.index, module.scaling[n])
            for a, n in zip(adapters, names)
            if n in module.lora_A or n in module.lora_embedding_A
        ]
        layers.append(
            {
                "module": module_name,
                "embedding": COMBINED in module.lora_embedding_A,
                "in_features": module.in_features,
                "out_features": module.out_features,
                "scaling": module.scaling[COMBINED],
                "present": present,
            }
        )
    return layers


def _lora_uses(adapters: list[Adapter], tensors: list[PlannedTensor]) -> dict[str, list[tuple[str, Any]]]:
    """Per module, in manifest order: (output tensor, op) of every LoRA delta planned for it."""
    modules = {(a.index, k.key): k.module for a in adapters for k in a.keys}
    uses: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for t in tensors:
        for op in t.ops:
            if op.kind == "delta" and op.layout in LORA_LAYOUTS:
                uses[modules[op.adapter, op.keys[0]]].append((t.name, op))
    for found in uses.values():
        found.sort(key=lambda use: use[1].adapter)
    return uses


def _module(
    method: str,
    effective: str,
    layer: dict[str, Any],
    found: list[tuple[str, Any]] | None,
    *,
    adapters: list[Adapter],
    rank: int,
) -> CombinedModule:
    """One combined module, checked against the per-adapter plan."""
    name = layer["module"]
    present = dict(layer["present"])
    have = {op.adapter for _, op in found or []}
    if not found:
        raise PlanError(
            f"`combine: {method}`: PEFT gives the combined adapter module `{name}`, which no adapter has "
            "factors for; add_weighted_adapter would fail there; use `combine: sum`"
        )
    for index in sorted(set(present) ^ have):
        problem = (
            "targets it but its file has no factors for it: PEFT would combine its untrained initial factors"
            if index in present
            else "has factors for it that PEFT does not load (its config does not target it)"
        )
        raise PlanError(f"`combine: {method}`: adapter {index} {problem} at `{name}`; use `combine: sum`")
    layouts = {op.layout for _, op in found}
    if len(layouts) > 1:
        raise PlanError(
            f"`combine: {method}`: the adapters see `{name}` with different layouts {sorted(layouts)} "
            "(fan_in_fan_out differs?)"
        )
    layout = layouts.pop()
    if (layout == "embedding") != layer["embedding"]:
        raise PlanError(
            f"`combine: {method}`: `{name}` is {'an embedding' if layer['embedding'] else 'not an embedding'} "
            "for PEFT but the adapters' keys say otherwise"
        )
    weights = {a.index: a.weight for a in adapters}
    inputs = tuple(
        CombinedInput(op.adapter, op.keys[0], op.keys[1], present[op.adapter], weights[op.adapter]) for _, op in found
    )
    entries = {(a.index, k.key): k.entry.shape for a in adapters for k in a.keys}
    a_shapes = {entries[i.adapter, i.lora_a] for i in inputs}
    b_shapes = {entries[i.adapter, i.lora_b] for i in inputs}
    module_rank = rank
    traits = COMBINE_METHODS[effective]
    if traits.same_rank:
        if len(a_shapes) > 1 or len(b_shapes) > 1:
            raise PlanError(
                f"`combine: {method}` needs equal factor shapes at each module, as PEFT stacks them; "
                f"`{name}` has A {sorted(map(list, a_shapes))} and B {sorted(map(list, b_shapes))} (rank_pattern?)"
            )
        module_rank = next(iter(a_shapes))[0]
    elif traits.svd and rank > min(layer["in_features"], layer["out_features"]):
        raise PlanError(
            f"`combine: {method}`: rank {rank} is larger than `{name}` allows "
            f"({layer['out_features']}x{layer['in_features']}); give a smaller `svd_rank`"
        )
    return CombinedModule(
        name, found[0][0], layout, layer["in_features"], layer["out_features"], module_rank, layer["scaling"], inputs
    )
