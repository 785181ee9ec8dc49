"""A PEFT LoRA adapter folder: its config and its tensor keys, read without tensor data."""

from __future__ import annotations

import atexit
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_lite.errors import AdapterError
from mergekit_lite.io.format import FLOAT_DTYPES, TensorEntry, read_header
from mergekit_lite.io.reader import TensorReader
from mergekit_lite.sources.checkpoint import read_json
from mergekit_lite.vocabulary import KeyKind

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"

# LoraConfig fields (peft 0.21) that change nothing in the merge or are handled below.
KNOWN_KEYS = {
    "alpha_pattern",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "layers_pattern",
    "layers_to_transform",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "target_parameters",
    "task_type",
    "trainable_token_indices",
    "use_dora",
    "use_rslora",
    "ensure_weight_tying",
    "eva_config",
    "corda_config",
    "loftq_config",
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
}
# Fields that, when set, change the forward pass in a way a dense merge cannot express.
UNMERGEABLE = {
    "layer_replication": "it duplicates layers of the base model",
    "alora_invocation_tokens": "an activated LoRA only acts after its invocation tokens",
    "arrow_config": "Arrow routes between adapters per token",
    "use_qalora": "QA-LoRA pools inputs group-wise",
    "use_bdlora": "block-diagonal LoRA is not supported yet",
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
    kind: KeyKind  # see vocabulary.py
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
    weights_file: Path | None = None  # the file the factors came from (adapter_model.safetensors or .bin)

    def reader(self) -> TensorReader:
        """A reader of this adapter's tensors by key (nothing stays open between reads)."""
        return TensorReader({k.key: k.entry for k in self.keys})

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


def task_type(adapters: list[Adapter]) -> str | None:
    """The adapters' PEFT `task_type` (which model class they were trained on); they must agree."""
    kinds = {a.config["task_type"]: a for a in adapters if isinstance(a.config.get("task_type"), str)}
    if len(kinds) > 1:
        (one, a), (other, b) = list(kinds.items())[:2]
        raise AdapterError(
            f"{a.label} has `task_type` {one!r} but {b.label} has {other!r}: adapters trained on different "
            "model classes cannot be merged into one model"
        )
    return next(iter(kinds), None)


def read_adapter(path: Path, index: int, weight: float, allow_pickle: bool = False) -> Adapter:
    """Read and vet an adapter folder; refuse what cannot be merged, saying why.

    A pickle-only adapter is read only with `allow_pickle`, through `torch.load(weights_only=True)`,
    and converted to a temporary safetensors file that the rest of the pipeline reads as usual.
    """
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
    weights = source = path / WEIGHTS
    if not weights.is_file():
        source = path / PICKLE
        if not source.exists():
            raise AdapterError(f"{label}: no {WEIGHTS} in `{path}`")
        if not allow_pickle:
            raise AdapterError(
                f"{label}: only a pickle `{PICKLE}` is present; pickles can run code, so mergekit-lite "
                "reads safetensors only: re-save the adapter with `save_pretrained(..., safe_serialization=True)`, "
                "or set `allow_pickle: true` on this adapter in the manifest to read it with torch.load(weights_only=True)"
            )
        weights = _from_pickle(source, label)
    header = read_header(weights)
    keys = [_classify(entry, label) for entry in header.tensors.values()]
    if not keys:
        raise AdapterError(f"{label}: `{source.name}` holds no tensors")
    _check_dora(config, keys, label)
    return Adapter(index, path, weight, config, keys, label, source)


def _from_pickle(path: Path, label: str) -> Path:
    """Load `adapter_model.bin` with torch.load(weights_only=True), which runs no code, and write its
    tensors to a temporary safetensors file (outside the output; removed when the process exits)."""
    import torch
    from safetensors.torch import save_file

    if not path.is_file():
        raise AdapterError(f"{label}: `{path}` is not a regular file")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001  any failure of the restricted unpickler means: not plain tensors
        raise AdapterError(
            f"{label}: `{path.name}` is not a plain tensor pickle; torch.load(weights_only=True) refused it "
            f"({_unpickling_reason(exc)}); it may try to run code: do not load it any other way"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterError(f"{label}: `{path.name}` does not hold a mapping of tensor names to tensors")
    folder = Path(tempfile.mkdtemp(prefix="mergekit-lite-pickle-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    target = folder / WEIGHTS
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(target), metadata={"format": "pt"})
    return target


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch's long weights_only message that names the problem (e.g. `unsupported GLOBAL
    posix.system`), not the lines that suggest loading the file unsafely."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[-1].strip().rstrip(".")[:200]
    skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
    useful = [line for line in lines if not line.startswith(skip)]
    return (useful[0] if useful else type(exc).__name__)[:200]


def _check_dora(config: dict[str, Any], keys: list[AdapterKey], label: str) -> None:
    """`use_dora` and the presence of magnitude vectors must agree, module by module."""
    factored = {k.module for k in keys if k.kind in ("lora_A", "emb_A")}
    magnitudes = {k.module for k in keys if k.kind == "magnitude"}
    if config.get("use_dora") and factored - magnitudes:
        module = sorted(factored - magnitudes)[0]
        raise AdapterError(
            f"{label}: `use_dora` is true but `{module}` has no `lora_magnitude_vector`; "
            "the config and the weights do not belong together"
        )
    if not config.get("use_dora") and magnitudes:
        raise AdapterError(
            f"{label}: `{sorted(magnitudes)[0]}` has a DoRA `lora_magnitude_vector` but `use_dora` is not true "
            "in adapter_config.json; the config and the weights do not belong together"
        )


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
    if type(init) is not bool and not (isinstance(init, str) and init in SAFE_INITS):
        raise AdapterError(
            f"{label}: `init_lora_weights` {repr(init)[:60]} is a LoRA variant mergekit-lite does not support"
        )
    _check_types(config, label)
    for key, why in UNMERGEABLE.items():
        if config.get(key):
            raise AdapterError(f"{label}: `{key}` is set, and {why}; this adapter cannot be merged into dense weights")
    if config.get("target_parameters"):
        _vet_parameter_targets(config, label)
    unknown = sorted(set(config) - KNOWN_KEYS - set(UNMERGEABLE))
    if unknown:
        log.warning("%s: adapter_config.json keys unknown to mergekit-lite, ignored: %s", label, ", ".join(unknown))


# What PEFT's lora.ParamWrapper (`target_parameters`) refuses to build, so no such adapter was trained.
PARAMETER_WRAPPER_REFUSES = ("use_dora", "lora_bias", "fan_in_fan_out", "lora_dropout")


def _vet_parameter_targets(config: dict[str, Any], label: str) -> None:
    targets = config["target_parameters"]
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        shown = repr(targets)[:60]
        raise AdapterError(f"{label}: `target_parameters` is {shown}; it must be a list of parameter names")
    for key in PARAMETER_WRAPPER_REFUSES:
        if config.get(key):
            raise AdapterError(
                f"{label}: `target_parameters` is set together with `{key}`, which PEFT's ParamWrapper refuses "
                "(it cannot build such an adapter), so this adapter cannot be merged as PEFT would run it"
            )


def _check_types(config: dict[str, Any], label: str) -> None:
    """The config fields the merge math reads must have the types PEFT gives them."""

    def bad(key: str, want: str) -> AdapterError:
        shown = repr(config[key])
        return AdapterError(f"{label}: `{key}` in adapter_config.json is {shown[:60]}; it must be {want}")

    def is_rank(v: Any) -> bool:
        return type(v) is int and v > 0

    def is_alpha(v: Any) -> bool:
        return type(v) in (int, float) and math.isfinite(v)

    if "r" in config and not is_rank(config["r"]):
        raise bad("r", "a positive integer")
    if "lora_alpha" in config and not is_alpha(config["lora_alpha"]):
        raise bad("lora_alpha", "a finite number")
    for key, check, want in (
        ("rank_pattern", is_rank, "positive integers"),
        ("alpha_pattern", is_alpha, "finite numbers"),
    ):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or not all(check(v) for v in patterns.values()):
            raise bad(key, f"a mapping of module patterns to {want}")
        for pattern in patterns:
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as exc:
                raise AdapterError(
                    f"{label}: `{key}` pattern {pattern!r} is not a valid regular expression ({exc})"
                ) from None
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(key) is not None and type(config[key]) is not bool:
            raise bad(key, "true or false")
    tokens = config.get("trainable_token_indices")
    if tokens is not None:
        lists = tokens.values() if isinstance(tokens, dict) else [tokens]
        if not all(isinstance(v, list) and all(type(i) is int and i >= 0 for i in v) for v in lists):
            raise bad("trainable_token_indices", "a list of token ids, or a mapping of module names to such lists")


def _classify(entry: TensorEntry, label: str) -> AdapterKey:
    key = entry.name
    if not key.startswith(PREFIX):
        raise AdapterError(f"{label}: tensor `{key}` does not start with `{PREFIX}`; not a PEFT LoRA file")
    if entry.dtype not in FLOAT_DTYPES:
        raise AdapterError(f"{label}: tensor `{key}` is stored as {entry.dtype}; LoRA tensors are floating point")
    rest = key[len(PREFIX) :]
    for suffix, kind, target_suffix in _SUFFIXES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            return AdapterKey(key, kind, module, module + target_suffix, entry)
    if ".lora_" in rest:
        raise AdapterError(f"{label}: tensor `{key}` is a LoRA tensor of a kind mergekit-lite does not know")
    module, _, leaf = rest.rpartition(".")
    return AdapterKey(key, "replace", module, rest, entry)
