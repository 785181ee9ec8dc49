"""What transformers makes of a base checkpoint: its model class, its embeddings, and how the
checkpoint's on-disk tensor names become the module names that PEFT saw.

The model class comes from the adapter's `task_type` and the base's `architectures`; the model is
built on the meta device (no weights), and every on-disk key is passed through transformers' own
loading conversions (`conversion_mapping.get_model_conversion_mapping` and the renaming that
`from_pretrained` applies, `core_model_loading.rename_source_key`). That gives, without a table of
our own per architecture:

- `renames`: on-disk name -> module name, where they differ (LLaVA's `language_model.model.X` ->
  `model.language_model.X`, Qwen2.5-VL's `model.X` -> `model.language_model.X`, GPT-NeoX's
  `embed_out` -> `lm_head`, Mixtral's `block_sparse_moe` -> `mlp`, a base saved without its head's
  prefix);
- `fused`: module tensors that transformers builds from several on-disk tensors (MoE experts
  stored one by one, fused into 3-D parameters at load time), with the on-disk keys they come from.

The release keeps the on-disk names: the plan maps adapter module names back through `renames`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_lite.sources import fused as fused_layout

log = logging.getLogger(__name__)

# PEFT task types -> the transformers auto class PEFT's users load the base with.
TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


@dataclass(frozen=True)
class Architecture:
    """The model transformers builds for a checkpoint (names are module names, as PEFT sees them)."""

    model_class: str | None  # a transformers class name; None when the model could not be built
    tied: bool
    input_embedding: str | None
    output_embedding: str | None
    renames: dict[str, str] = field(default_factory=dict)  # on-disk name -> module name, where they differ
    fused: dict[str, list[str]] = field(default_factory=dict)  # module tensor -> on-disk tensors it is built from
    output_on_disk: str | None = None  # the on-disk name an output embedding not stored would have
    fusion: dict[str, dict[str, Any]] = field(default_factory=dict)  # how each fused tensor is built (fused.py)
    parameters: dict[str, list[list[Any]]] = field(default_factory=dict)  # modules' nestable parameters (fused.py)
    aliases: dict[str, list[str]] = field(default_factory=dict)  # module tensor -> the others tied to it
    untied_aliases: dict[str, list[str]] = field(default_factory=dict)  # the same with tie_word_embeddings false

    def to_json(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "tied": self.tied,
            "input_embedding": self.input_embedding,
            "output_embedding": self.output_embedding,
            "renames": self.renames,
            "fused": self.fused,
            "output_on_disk": self.output_on_disk,
            "fusion": self.fusion,
            "parameters": self.parameters,
            "aliases": self.aliases,
            "untied_aliases": self.untied_aliases,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Architecture | None:
        """The cached form back, or None when it is not one."""
        if not isinstance(doc, dict) or set(doc) != set(cls.__dataclass_fields__):
            return None
        names = ("model_class", "input_embedding", "output_embedding", "output_on_disk")
        if not isinstance(doc["tied"], bool) or not all(doc[k] is None or isinstance(doc[k], str) for k in names):
            return None
        renames, fused = doc["renames"], doc["fused"]
        if not isinstance(renames, dict) or not all(isinstance(v, str) for v in renames.values()):
            return None
        if not isinstance(fused, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in fused.values()
        ):
            return None
        if not fused_layout.valid(doc["fusion"], doc["parameters"]):
            return None
        for aliases in (doc["aliases"], doc["untied_aliases"]):
            if not isinstance(aliases, dict) or not all(
                isinstance(v, list) and all(isinstance(s, str) for s in v) for v in aliases.values()
            ):
                return None
        return cls(**doc)


def model_class_name(cfg: Any, task_type: str | None) -> str:
    """The transformers class for a base config and an adapter's task type.

    With a task type, the class its auto class picks for this config (a SEQ_CLS adapter on a Llama
    is LlamaForSequenceClassification), unless that auto class has none for it or the base's own
    `architectures` class is already that task's (a causal LM adapter on LLaVA loads
    LlavaForConditionalGeneration; a vision-language base keeps its class for a causal LM adapter
    even where the auto class has a text-only one, as Mllama's). A feature-extraction adapter on a
    base whose class has no head (BertModel, T5EncoderModel) keeps that class. Without a task type,
    the base's `architectures` class, else a causal LM.
    """
    import transformers

    named = next(iter(getattr(cfg, "architectures", None) or []), None)
    own = getattr(transformers, named, None) if isinstance(named, str) else None
    if task_type == "FEATURE_EXTRACTION" and own is not None and "For" not in own.__name__:
        return own.__name__  # a model without a head already (T5EncoderModel, which AutoModel is not)
    if task_type in (None, "CAUSAL_LM") and own is not None and own.__name__.endswith("ForConditionalGeneration"):
        if getattr(cfg, "vision_config", None) is not None:  # a vision-language model, as its users load it
            return own.__name__  # (AutoModelForCausalLM makes Mllama's text model alone)
    auto_name = TASK_CLASSES.get(task_type or "")
    if auto_name is not None:
        try:
            picked = getattr(transformers, auto_name)._model_mapping[type(cfg)]
        except (KeyError, ValueError):
            picked = None
        if picked is not None and (own is None or picked is not own):
            if own is None or not _same_task(own.__name__, picked.__name__):
                return picked.__name__
    if own is not None:
        return own.__name__
    return TASK_CLASSES["CAUSAL_LM"]


def _same_task(own: str, picked: str) -> bool:
    """Whether the base's class already serves the task picked (e.g. both are conditional generation)."""
    suffix = picked[picked.find("For") :] if "For" in picked else picked
    return own.endswith(suffix)


def meta_model(class_name: str, cfg: Any) -> Any:
    """The model of `class_name` for `cfg` on the meta device (no weights are allocated)."""
    import torch
    import transformers

    cls = getattr(transformers, class_name)
    with torch.device("meta"):
        if class_name.startswith("Auto"):
            return cls.from_config(cfg)
        return cls._from_config(cfg)


def describe(path: Path, tensor_names: list[str], task_type: str | None) -> Architecture:
    """Build the base's model on the meta device and read off its class, embeddings and key mapping.

    Raises whatever transformers raises for an architecture it cannot build (the caller falls back).
    """
    import torch
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.from_pretrained(path)
        class_name = model_class_name(cfg, task_type)
        model = meta_model(class_name, cfg)
    names = {id(m): n for n, m in model.named_modules()}
    in_mod, out_mod = model.get_input_embeddings(), model.get_output_embeddings()
    inp = f"{names[id(in_mod)]}.weight" if in_mod is not None and id(in_mod) in names else None
    out = f"{names[id(out_mod)]}.weight" if out_mod is not None and id(out_mod) in names else None
    weight_in = getattr(in_mod, "weight", None)
    weight_out = getattr(out_mod, "weight", None)
    if isinstance(weight_in, torch.Tensor) and isinstance(weight_out, torch.Tensor):
        tied = weight_in is weight_out
    else:
        tied = bool(getattr(cfg.get_text_config(), "tie_word_embeddings", False))
    renames, fused, fusion = _key_mapping(model, tensor_names)
    aliases = _aliases(model)
    beyond_pair = tied and any(set(v) - {inp, out} for v in aliases.values())  # T5's, BART's embed_tokens
    return Architecture(
        model_class=type(model).__name__,
        tied=tied,
        input_embedding=inp,
        output_embedding=out,
        renames=renames,
        fused=fused,
        output_on_disk=_on_disk_name(model, out, renames) if out is not None else None,
        fusion=fusion,
        parameters=fused_layout.parameters(model),
        aliases=aliases,
        untied_aliases=_untied_aliases(class_name, cfg) if beyond_pair else {},
    )


def _untied_aliases(class_name: str, cfg: Any) -> dict[str, list[str]]:
    """The ties left when the release unties lm_head (`tie_word_embeddings: false`): in BART none,
    its encoder's and decoder's `embed_tokens` then load from tensors of their own; T5 keeps them."""
    doc = cfg.to_dict()  # as transformers reads the release's config.json (T5's keeps its ties)
    doc["tie_word_embeddings"] = False
    if isinstance(doc.get("text_config"), dict):
        doc["text_config"]["tie_word_embeddings"] = False
    untied = type(cfg).from_dict(doc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _aliases(meta_model(class_name, untied))


def _aliases(model: Any) -> dict[str, list[str]]:
    """Module tensors that are one parameter (tied weights: T5's `shared`, `encoder.embed_tokens`,
    `decoder.embed_tokens`, `lm_head`), each -> the others."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {n: [o for o in g if o != n] for g in groups.values() if len(g) > 1 for n in g}


def _conversions(model: Any) -> tuple[list[Any], list[Any]]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    return (
        [t for t in transforms if isinstance(t, WeightRenaming)],
        [t for t in transforms if isinstance(t, WeightConverter)],
    )


def _key_mapping(
    model: Any, tensor_names: list[str]
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Each on-disk key as from_pretrained loads it (convert_and_load_state_dict_in_model's renaming),
    and how the fused tensors are built (fused.py)."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _conversions(model)
    prefix = model.base_model_prefix
    loaded = model.state_dict()
    renames: dict[str, str] = {}
    fused: dict[str, list[str]] = {}
    fusion: dict[str, dict[str, Any]] = {}
    for key in tensor_names:
        name, pattern = rename_source_key(key, renamings, converters, prefix, loaded)
        if name not in loaded and key in loaded:
            name, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=loaded)
        if name not in loaded:
            continue  # a tensor the model does not load (the structure check keeps it as it is)
        if pattern is not None:
            fused.setdefault(name, []).append(key)
            fused_layout.record(fusion, converters, name, key, pattern)
        elif name != key:
            renames[key] = name
    return renames, fused, fusion


def _on_disk_name(model: Any, module_name: str, renames: dict[str, str]) -> str:
    """Where a tensor that the checkpoint does not store (a tied lm_head) would be stored, in the
    checkpoint's own layout: the module name when the checkpoint uses module names, else the name
    transformers' save_pretrained gives it (its conversions reversed)."""
    if not renames:
        return module_name
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming, rename_source_key

    # as transformers' revert_weight_conversion does for a model not loaded with from_pretrained
    saved = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    back = [t.reverse_transform() for t in saved[::-1]]
    disk, _ = rename_source_key(
        module_name,
        [t for t in back if isinstance(t, WeightRenaming)],
        [t for t in back if isinstance(t, WeightConverter)],
        reverse=True,
    )
    renamings, converters = _conversions(model)
    forward, _ = rename_source_key(disk, renamings, converters, model.base_model_prefix, model.state_dict())
    return disk if forward == module_name else module_name
