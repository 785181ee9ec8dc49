"""A PEFT LoRA adapter folder: its config and its tensor keys, read without tensor data."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_lite.checkpoint import read_json
from mergekit_lite.errors import AdapterError
from mergekit_lite.stformat import TensorEntry, read_header

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"

# LoraConfig fields (peft 0.21) that change nothing in the merge or are handled below.
KNOWN_KEYS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "exclude_modules", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform", "lora_alpha", "lora_bias",
    "lora_dropout", "modules_to_save", "peft_type", "peft_version", "r", "rank_pattern", "revision",
    "target_modules", "task_type", "trainable_token_indices", "use_dora", "use_rslora", "ensure_weight_tying",
    "eva_config", "corda_config", "loftq_config", "runtime_config", "megatron_core", "qalora_group_size",
}
# Fields that, when set, change the forward pass in a way a dense merge cannot express.
UNMERGEABLE = {
    "layer_replication": "it duplicates layers of the base model",
    "alora_invocation_tokens": "an activated LoRA only acts after its invocation tokens",
    "arrow_config": "Arrow routes between adapters per token",
    "use_qalora": "QA-LoRA pools inputs group-wise",
    "use_bdlora": "block-diagonal LoRA is not supported yet",
    "target_parameters": "LoRA on bare parameters is not supported yet",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "kasa_config": "the KaSA variant is not supported",
    "monteclora_config": "the MonteCLoRA variant is not supported",
    "velora_config": "the VeLoRA variant is not supported",
    "lora_ga_config": "LoRA-GA changes the base weights at initialisation",
}
SAFE_INITS = {True, False, "gaussian", "eva", "orthogonal"}
MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# (suffix, kind, what the suffix stands for on the base tensor)
_SUFFIXES = (
    (".lora_A.weight", "lora_A", ".weight"),
    (".lora_B.weight", "lora_B", ".weight"),
    (".lora_B.bias", "lora_bias", ".bias"),
    (".lora_embedding_A", "emb_A", ".weight"),
    (".lora_embedding_B", "emb_B", ".weight"),
    (".lora_magnitude_vector.weight", "magnitude", ".weight"),
    (".lora_magnitude_vector", "magnitude", ".weight"),
    (".token_adapter.trainable_tokens_delta", "tokens", ".weight"),
    (".base_layer.weight", "base_layer", ".weight"),
    (".base_layer.bias", "base_layer", ".bias"),
    (".modules_to_save.weight", "replace", ".weight"),
    (".modules_to_save.bias", "replace", ".bias"),
    (".original_module.weight", "original", ".weight"),
    (".original_module.bias", "original", ".bias"),
)


@dataclass(frozen=True)
class AdapterKey:
    """One tensor of an adapter file, classified."""

    key: str  # as stored in the adapter file
    kind: str  # lora_A, lora_B, lora_bias, emb_A, emb_B, magnitude, tokens, base_layer, replace, original
    module: str  # model module path, e.g. model.layers.0.self_attn.q_proj
    target: str  # base tensor it concerns, e.g. model.layers.0.self_attn.q_proj.weight
    entry: TensorEntry


@dataclass
class Adapter:
    """A LoRA adapter: config, tensor keys, and derived settings."""

    index: int
    path: Path
    weight: float
    config: dict[str, Any]
    keys: list[AdapterKey]
    label: str

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, alpha) for a module, honouring rank_pattern and alpha_pattern like PEFT."""
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        return int(r), float(alpha)

    def scaling(self, module: str) -> float:
        """alpha / r, or alpha / sqrt(r) with use_rslora: the one home of PEFT's scaling formula."""
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # first match wins, as in peft.utils.other.get_pattern_key
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: Path, index: int, weight: float) -> Adapter:
    """Read and vet an adapter folder; refuse what cannot be merged, saying why."""
    label = f"adapter {index} (`{path.name}`)"
    if not path.exists():
        raise AdapterError(f"{label}: `{path}` does not exist")
    if not path.is_dir():
        raise AdapterError(f"{label}: `{path}` is not a folder (give the folder PEFT's save_pretrained wrote)")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{label}: no adapter_config.json in `{path}`; is it a PEFT adapter folder?")
    config = read_json(cfg_path)
    _vet_config(config, label)
    weights = path / WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterError(
                f"{label}: only a pickle `adapter_model.bin` is present; pickles can run code, so mergekit-lite "
                "reads safetensors only: re-save the adapter with `save_pretrained(..., safe_serialization=True)`"
            )
        raise AdapterError(f"{label}: no {WEIGHTS} in `{path}`")
    header = read_header(weights)
    keys = [_classify(entry, label) for entry in header.tensors.values()]
    if not keys:
        raise AdapterError(f"{label}: `{weights.name}` holds no tensors")
    return Adapter(index, path, weight, config, keys, label)


def _vet_config(config: dict[str, Any], label: str) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"{label}: `peft_type` is {peft_type!r}; mergekit-lite merges LoRA adapters only "
            "(merge other PEFT types with PEFT's own merge_and_unload)"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        raise AdapterError(
            f"{label}: `init_lora_weights` is {init!r}: this adapter was initialised from the base weights, which "
            "PEFT changed, so it only fits that modified base. Re-save it converted, with "
            "`model.save_pretrained(out, path_initial_model_for_weight_conversion=<the initial adapter>)`, "
            "and merge the converted adapter (rank 2r) into the original base"
        )
    if init not in SAFE_INITS:
        raise AdapterError(f"{label}: `init_lora_weights` {init!r} is a LoRA variant mergekit-lite does not support")
    for key, why in UNMERGEABLE.items():
        if config.get(key):
            raise AdapterError(f"{label}: `{key}` is set, and {why}; this adapter cannot be merged into dense weights")
    unknown = sorted(set(config) - KNOWN_KEYS - set(UNMERGEABLE))
    if unknown:
        log.warning("%s: adapter_config.json keys unknown to mergekit-lite, ignored: %s", label, ", ".join(unknown))


def _classify(entry: TensorEntry, label: str) -> AdapterKey:
    key = entry.name
    if not key.startswith(PREFIX):
        raise AdapterError(f"{label}: tensor `{key}` does not start with `{PREFIX}`; not a PEFT LoRA file")
    rest = key[len(PREFIX):]
    for suffix, kind, target_suffix in _SUFFIXES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            return AdapterKey(key, kind, module, module + target_suffix, entry)
    if ".lora_" in rest:
        raise AdapterError(f"{label}: tensor `{key}` is a LoRA tensor of a kind mergekit-lite does not know")
    module, _, leaf = rest.rpartition(".")
    return AdapterKey(key, "replace", module, rest, entry)
