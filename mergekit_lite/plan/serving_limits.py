"""THE table of what vLLM, SGLang and TGI do with an unmerged PEFT LoRA adapter, each row citing
the runtime's documentation or code (read for this table; re-check a row when its runtime moves).

`serves`: True = applied as PEFT applies it; False = refused at load, or loaded with that part
left out (the adapter then runs differently from PEFT: merging is the only way to deploy it);
None = the runtime documents nothing about it (the lint says "unknown", never "yes").
The features are those of sources/adapter.py's key kinds (plan/serving.py finds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Runtime = Literal["vLLM", "SGLang", "TGI"]
Feature = Literal["dora", "modules_to_save", "trainable_tokens", "lora_bias", "embedding_lora", "lm_head_lora"]
RUNTIMES: tuple[Runtime, ...] = ("vLLM", "SGLang", "TGI")

VLLM_PEFT_HELPER = "vllm-project/vllm vllm/lora/peft_helper.py PEFTHelper._validate_features (02143692)"
VLLM_PARSE = "vllm-project/vllm vllm/lora/utils.py parse_fine_tuned_lora_name (0fd15707)"
VLLM_LORA_MODEL = "vllm-project/vllm vllm/lora/lora_model.py LoRAModel.from_lora_tensors (532cc258)"
VLLM_MODULES = "vllm-project/vllm vllm/lora/utils.py get_supported_lora_modules (0fd15707)"
VLLM_CONFIG = "https://docs.vllm.ai/en/v0.22.1/api/vllm/config/lora/ (LoRAConfig.max_lora_rank = 16; MaxLoRARanks)"
SGLANG_DOCS = "SGLang docs, advanced_features/lora (LoRA Serving: max_lora_rank, lora_target_modules)"
SGLANG_MODULES = "sgl-project/sglang python/sglang/srt/utils/common.py SUPPORTED_LORA_TARGET_MODULES"
TGI_CONFIG = (
    "huggingface/text-generation-inference server/text_generation_server/adapters/lora.py LoraConfig (db931fcf)"
)
TGI_LAYERS = (
    "huggingface/text-generation-inference server/text_generation_server/models/__init__.py "
    "adapter_layers; unused weights are only logged (db931fcf)"
)
TGI_SGMV = (
    "huggingface/text-generation-inference server/text_generation_server/adapters/lora.py can_vectorize (db931fcf)"
)


@dataclass(frozen=True)
class FeatureLimit:
    """What one runtime does with one adapter feature."""

    runtime: Runtime
    feature: Feature
    serves: bool | None
    how: str
    source: str


@dataclass(frozen=True)
class RankLimit:
    """The largest rank a runtime serves without being told, and the most it can be told."""

    runtime: Runtime
    default: int | None  # None: sized from the adapters given at start-up
    choices: tuple[int, ...] | None  # the values its flag accepts (None: any)
    flag: str
    source: str


@dataclass(frozen=True)
class ModuleLimit:
    """Which target modules (leaf names) a runtime applies LoRA to; None: every linear layer."""

    runtime: Runtime
    modules: frozenset[str] | None
    otherwise: str  # what happens to a module outside the set
    source: str


FEATURES: tuple[FeatureLimit, ...] = (
    FeatureLimit("vLLM", "dora", False, "refused at load: 'vLLM does not yet support DoRA'", VLLM_PEFT_HELPER),
    FeatureLimit(
        "vLLM", "modules_to_save", False, "refused: 'vLLM only supports modules_to_save being None'", VLLM_PEFT_HELPER
    ),
    FeatureLimit(
        "vLLM", "trainable_tokens", False, "refused: `trainable_tokens_delta` 'is unsupported LoRA weight'", VLLM_PARSE
    ),
    FeatureLimit("vLLM", "lora_bias", False, "refused: `lora_B.bias` 'is unsupported LoRA weight'", VLLM_PARSE),
    FeatureLimit(
        "vLLM",
        "embedding_lora",
        True,
        "served when the model class lists the embedding and the vocabulary is the base's",
        VLLM_LORA_MODEL,
    ),
    FeatureLimit("vLLM", "lm_head_lora", True, "served when the model class lists lm_head", VLLM_MODULES),
    FeatureLimit("SGLang", "dora", None, "not documented", SGLANG_DOCS),
    FeatureLimit("SGLang", "modules_to_save", None, "not documented", SGLANG_DOCS),
    FeatureLimit("SGLang", "trainable_tokens", None, "not documented", SGLANG_DOCS),
    FeatureLimit("SGLang", "lora_bias", None, "not documented", SGLANG_DOCS),
    FeatureLimit("SGLang", "embedding_lora", None, "not among the documented target modules", SGLANG_MODULES),
    FeatureLimit("SGLang", "lm_head_lora", None, "not among the documented target modules", SGLANG_MODULES),
    FeatureLimit(
        "TGI", "dora", False, "ignored: only r, alpha, targets, rslora are read; runs as plain LoRA", TGI_CONFIG
    ),
    FeatureLimit("TGI", "modules_to_save", False, "ignored: the replaced weights are left unused", TGI_LAYERS),
    FeatureLimit("TGI", "trainable_tokens", False, "ignored: the token rows are left unused", TGI_LAYERS),
    FeatureLimit("TGI", "lora_bias", False, "ignored: only lora_A / lora_B weights are mapped", TGI_CONFIG),
    FeatureLimit("TGI", "embedding_lora", False, "ignored: embeddings are not an adapter layer", TGI_LAYERS),
    FeatureLimit("TGI", "lm_head_lora", False, "ignored: lm_head is not an adapter layer", TGI_LAYERS),
)

RANKS: tuple[RankLimit, ...] = (
    RankLimit("vLLM", 16, (1, 8, 16, 32, 64, 128, 256, 320, 512), "--max-lora-rank", VLLM_CONFIG),
    RankLimit("SGLang", None, None, "--max-lora-rank", SGLANG_DOCS),
    RankLimit("TGI", None, None, "", TGI_SGMV),
)

MODULES: tuple[ModuleLimit, ...] = (
    ModuleLimit("vLLM", None, "refused: 'expected target modules in ...'", VLLM_MODULES),
    ModuleLimit(
        "SGLang",
        frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        "not served (`--lora-target-modules` takes only these)",
        SGLANG_MODULES,
    ),
    ModuleLimit(
        "TGI",
        frozenset(
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "c_proj", "c_fc"}
        ),
        "ignored: its weights are left unused (a warning)",
        TGI_LAYERS,
    ),
)
