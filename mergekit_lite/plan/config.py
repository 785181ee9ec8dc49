"""config.json as the plan makes it true: what release/configs.py writes and gate/structure.py checks."""

from __future__ import annotations

from typing import Any

from mergekit_lite.io.format import TORCH_NAMES
from mergekit_lite.plan.plan import Plan

# transformers 4's names for what transformers 5 keeps in `rope_parameters` and `dtype`: a portable
# release (plan/compat.py) writes them beside v5's; the gate proves both layouts agree.
LEGACY_CONFIG_KEYS = ("rope_theta", "rope_scaling", "partial_rotary_factor", "torch_dtype")
# tokenizer_config.json: what transformers 5 writes that transformers 4 cannot read or does not use
V5_ONLY_TOKENIZER_CLASSES = ("TokenizersBackend",)
V5_ONLY_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only")


def reconciled_config(base_config: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The base config with dtype, vocab_size, tie_word_embeddings and quantization_config made true of
    the output tensors (an FP8 release's quantization_config is the plan's, plan/fp8.py)."""
    config = dict(base_config)
    config.pop("quantization_config", None)
    if plan.quantization_config is not None:
        config["quantization_config"] = dict(plan.quantization_config)
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
