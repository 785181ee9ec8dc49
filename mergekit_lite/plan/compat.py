"""A portable release: config.json and tokenizer_config.json that transformers 4.4x and 5.x read alike.

Pure functions of the source's files (plan layer): release/compat.py writes what they give, and a
field-by-field comparison of the release with its sources (the gate's config check) can accept
exactly these differences with these values. gate/portable.py checks, from the readers' side and
without this code, that the two layouts agree.

A base saved by transformers 5 keeps RoPE in `rope_parameters` and names its tokenizer class
`TokenizersBackend`. transformers 4 reads neither: it takes `rope_theta` (default 10000) and
`rope_scaling` from the top level, so it loads such a config without a word and computes wrong
logits, and its AutoTokenizer refuses the class. The functions here write the transformers 4
layout beside the v5 one (`output.compat: false` ships the files as the source has them):

  config.json            `rope_parameters` (flat) -> `rope_theta`, `partial_rotary_factor`, and
                         `rope_scaling` (the parameters less those two) unless the type is `default`;
                         `dtype` -> `torch_dtype`. Nested per-layer-type parameters are left alone:
                         their 4.x layout is the architecture's own (say Gemma 3's `rope_local_base_freq`).
  tokenizer_config.json  `tokenizer_class: TokenizersBackend` -> `PreTrainedTokenizerFast` (which reads
                         tokenizer.json as it is); a list `extra_special_tokens` -> 4.x's
                         `additional_special_tokens`; the template of chat_template.jinja also as
                         `chat_template` (4.4x before the file existed); v5's save-time keys
                         `backend`, `is_local`, `local_files_only` dropped.

transformers 5 reads the result as it read the source (the gate's packaging checks prove it, and that
both layouts agree).
"""

from __future__ import annotations

from typing import Any

from mergekit_lite.plan.config import V5_ONLY_TOKENIZER_CLASSES, V5_ONLY_TOKENIZER_KEYS

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with transformers 4's top-level keys written beside v5's (sub-configs too)."""
    out = dict(config)
    for key, value in config.items():
        if isinstance(value, dict) and "rope_parameters" in value:  # a text_config and the like
            out[key] = portable_config(value)
    if "dtype" in out and isinstance(out["dtype"], str):
        out["torch_dtype"] = out["dtype"]
    rope = out.get("rope_parameters")
    if not isinstance(rope, dict) or not rope or any(isinstance(v, dict) for v in rope.values()):
        return out
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    # default only when neither name says otherwise and no scaling parameter is left: transformers 5
    # saves Qwen2-VL's M-RoPE as {rope_type: default, type: mrope, mrope_section} and Qwen3-VL's as
    # {rope_type: default, mrope_section, mrope_interleaved}, which 4.x reads from `rope_scaling`
    if _default_rope(rope):
        if out.get("rope_scaling") is not None:  # v5 would read it in place of rope_parameters
            out["rope_scaling"] = None
    else:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return out


def _default_rope(rope: dict[str, Any]) -> bool:
    """Plain RoPE: the default type under both names, nothing but theta and the partial factor besides."""
    names = ("rope_type", "type")
    plain = set(rope) <= {*names, "rope_theta", "partial_rotary_factor"}
    return plain and all(rope.get(k, "default") == "default" for k in names)


def portable_tokenizer_config(doc: dict[str, Any], chat_template: str | None) -> dict[str, Any]:
    """tokenizer_config.json that transformers 4 loads: a class it has, its key names, no v5 save artefacts."""
    out = {k: v for k, v in doc.items() if k not in V5_ONLY_TOKENIZER_KEYS}
    if out.get("tokenizer_class") in V5_ONLY_TOKENIZER_CLASSES:
        out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):  # v5's name for the list; 4.x expects a dict under that name
        out.pop("extra_special_tokens")
        out["additional_special_tokens"] = list(dict.fromkeys([*out.get("additional_special_tokens", []), *extra]))
    if chat_template is not None and "chat_template" not in out:
        out["chat_template"] = chat_template
    return out
