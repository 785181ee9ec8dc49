"""Tiny random base models and PEFT adapters, built locally for the oracle tests.

Every model is built from a fixed seed with ``save_pretrained`` (safetensors). Every adapter is
made so that it really changes the model (``init_lora_weights=False`` and/or perturbed
weights), because an adapter that is a no-op cannot catch a wrong merge.

What PEFT 0.21.2 saves (inspected on these adapters, keys without the ``base_model.model.``
prefix):

- LoRA factors: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``; embeddings
  ``<module>.lora_embedding_A`` / ``lora_embedding_B``; DoRA adds
  ``<module>.lora_magnitude_vector``; ``lora_bias=True`` adds ``<module>.lora_B.bias``.
- ``bias="all"``: ``<module>.bias`` for modules that are not LoRA targets and
  ``<module>.base_layer.bias`` for the targets; ``bias="lora_only"``: only the latter.
- ``modules_to_save``: the module's tensors under their plain base names
  (``lm_head.weight``, ``model.embed_tokens.weight``).
- ``trainable_token_indices``: ``<embedding>.token_adapter.trainable_tokens_delta``, holding
  the *full* new rows (initialised to a copy of the original rows, not to zero).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import IA3Config, LoKrConfig, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN = 32
LAYERS = 2
VOCAB = 96
RESIZED_VOCAB = 104
SEED = 1234

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- bases


def _llama_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )


def _gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )


def _qwen2_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


BASE_CONFIGS: dict[str, Callable[[], object]] = {
    "llama": lambda: _llama_config(tied=False),
    "llama_tied": lambda: _llama_config(tied=True),
    "gpt2": _gpt2_config,
    "qwen2": _qwen2_config,
}


def build_base(kind: str, out: Path) -> Path:
    """Build a tiny random model of ``kind`` (llama, llama_tied, gpt2, qwen2) into ``out``."""
    return save_base(BASE_CONFIGS[kind](), out)


def save_base(
    config,
    out: Path,
    *,
    seed: int = SEED,
    generation_config=None,
    tokenizer=None,
    max_shard_size: str | None = None,
) -> Path:
    """THE base builder of the tests: a random model of ``config`` from ``seed``, saved to ``out``
    (float32 safetensors, sharded at ``max_shard_size``), with ``generation_config`` and
    ``tokenizer`` when given.

    Biases and norm weights are randomised too (the defaults are all zeros / ones), so that a
    bias that is replaced instead of added, or a copied or perturbed tensor, shows up.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    if generation_config is not None:
        model.generation_config = generation_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def build_bf16_copy(src: Path, out: Path) -> Path:
    """Save ``src`` rounded to bfloat16 (the fair input for the accuracy comparison)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


def load_base(path: Path, dtype: torch.dtype = torch.float32, resize_to: int | None = None):
    """Load a base for PEFT, resizing its vocabulary first when the adapter expects it."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if resize_to is not None:
        torch.manual_seed(SEED)
        model.resize_token_embeddings(resize_to, mean_resizing=False)
    model.eval()
    return model


# --------------------------------------------------------------------------- adapters


def _perturb(model, predicate: Callable[[str], bool], scale: float, seed: int) -> int:
    """Add scale * N(0, 1) noise to every parameter whose name satisfies ``predicate``."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if predicate(name):
                param.add_(scale * torch.randn(param.shape, generator=gen).to(param.dtype))
                count += 1
    assert count, "perturbation matched no parameter"
    return count


def _peft(model, config, seed: int):
    torch.manual_seed(seed)
    return get_peft_model(model, config)


@dataclass(frozen=True)
class AdapterRecipe:
    base: str
    build: Callable[[Path, Path], None]  # (base_dir, out_dir) -> None
    resize_to: int | None = None


def _simple(
    base_kind: str,
    seed: int,
    perturb: tuple[Callable[[str], bool], float] | None = None,
    resize_to: int | None = None,
    **lora_kwargs,
) -> AdapterRecipe:
    lora_kwargs.setdefault("init_lora_weights", False)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")

    def build(base_dir: Path, out: Path) -> None:
        model = load_base(base_dir, resize_to=resize_to)
        peft_model = _peft(model, LoraConfig(**lora_kwargs), seed)
        if perturb is not None:
            _perturb(peft_model, perturb[0], perturb[1], seed)
        peft_model.save_pretrained(out)

    return AdapterRecipe(base_kind, build, resize_to)


def _pissa_converted(base_dir: Path, out: Path) -> None:
    model = load_base(base_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights="pissa",
        task_type="CAUSAL_LM",
    )
    peft_model = _peft(model, config, 11)
    initial = out.parent / f"{out.name}_initial"
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(initial)
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    _perturb(peft_model, lambda n: ".lora_" in n, 0.05, 11)  # "training"
    peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial))


def _pissa_unconverted(base_dir: Path, out: Path) -> None:
    model = load_base(base_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", task_type="CAUSAL_LM"
    )
    peft_model = _peft(model, config, 12)
    _perturb(peft_model, lambda n: ".lora_" in n, 0.05, 12)
    peft_model.save_pretrained(out)


def _non_lora(config_factory) -> Callable[[Path, Path], None]:
    def build(base_dir: Path, out: Path) -> None:
        model = load_base(base_dir)
        peft_model = _peft(model, config_factory(), 13)
        _perturb(peft_model, lambda n: "ia3_" in n or "lokr_" in n, 0.1, 13)
        peft_model.save_pretrained(out)

    return build


def _is_dora_magnitude(name: str) -> bool:
    return "lora_magnitude_vector" in name


def _is_bias(name: str) -> bool:
    return name.endswith(".bias") and "lora_" not in name


ADAPTERS: dict[str, AdapterRecipe] = {
    # plain LoRA on every linear layer (lm_head excluded by PEFT's "all-linear")
    "llama_lora": _simple("llama", 1, r=8, lora_alpha=16, target_modules="all-linear"),
    # a second, different adapter for the weighted combination
    "llama_lora_b": _simple(
        "llama", 2, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]
    ),
    "llama_rslora": _simple(
        "llama",
        3,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    ),
    "llama_patterns": _simple(
        "llama",
        4,
        r=8,
        lora_alpha=16,
        target_modules=LLAMA_LINEAR,
        rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 32, "model.layers.0.self_attn.o_proj": 3},
    ),
    "gpt2_lora": _simple(
        "gpt2", 5, r=8, lora_alpha=16, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]
    ),
    # DoRA's magnitude is initialised to ||W + dW||, which would make DoRA == LoRA: perturb it
    "llama_dora": _simple(
        "llama", 6, perturb=(_is_dora_magnitude, 0.3), r=8, lora_alpha=16, use_dora=True, target_modules=LLAMA_LINEAR
    ),
    "gpt2_dora": _simple(
        "gpt2",
        7,
        perturb=(_is_dora_magnitude, 0.3),
        r=8,
        lora_alpha=16,
        use_dora=True,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj", "c_fc"],
    ),
    "llama_embed_lora": _simple("llama", 8, r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"]),
    "qwen2_lora_bias": _simple(
        "qwen2",
        9,
        perturb=(lambda n: n.endswith("lora_B.default.bias"), 0.2),
        r=8,
        lora_alpha=16,
        lora_bias=True,
        target_modules=["q_proj", "k_proj", "v_proj"],
    ),
    "qwen2_bias_all": _simple(
        "qwen2",
        10,
        perturb=(_is_bias, 0.2),
        r=8,
        lora_alpha=16,
        bias="all",
        target_modules=["q_proj", "v_proj", "o_proj"],
    ),
    "qwen2_bias_lora_only": _simple(
        "qwen2",
        11,
        perturb=(lambda n: n.endswith("base_layer.bias"), 0.2),
        r=8,
        lora_alpha=16,
        bias="lora_only",
        target_modules=["q_proj", "k_proj"],
    ),
    "llama_mts_lm_head": _simple(
        "llama",
        12,
        perturb=(lambda n: "modules_to_save" in n, 0.05),
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
    ),
    "llama_tied_mts_lm_head": _simple(
        "llama_tied",
        13,
        perturb=(lambda n: "modules_to_save" in n, 0.05),
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
    ),
    "llama_resized": _simple(
        "llama",
        14,
        perturb=(lambda n: "modules_to_save" in n, 0.05),
        resize_to=RESIZED_VOCAB,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    ),
    "llama_tt_list": _simple(
        "llama",
        15,
        perturb=(lambda n: "trainable_tokens_delta" in n, 0.1),
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        trainable_token_indices=[3, 17, 90],
    ),
    "llama_tt_dict": _simple(
        "llama",
        16,
        perturb=(lambda n: "trainable_tokens_delta" in n, 0.1),
        r=8,
        lora_alpha=16,
        target_modules=["q_proj"],
        trainable_token_indices={"embed_tokens": [5, 6, 60]},
    ),
    "llama_tied_tt_list": _simple(
        "llama_tied",
        17,
        perturb=(lambda n: "trainable_tokens_delta" in n, 0.1),
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        trainable_token_indices=[3, 17, 90],
    ),
    "llama_tied_tt_dict": _simple(
        "llama_tied",
        18,
        perturb=(lambda n: "trainable_tokens_delta" in n, 0.1),
        r=8,
        lora_alpha=16,
        target_modules=["o_proj"],
        trainable_token_indices={"embed_tokens": [0, 44, 95]},
    ),
    "llama_layers_to_transform": _simple(
        "llama",
        19,
        r=8,
        lora_alpha=16,
        layers_to_transform=[1],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "llama_pissa_converted": AdapterRecipe("llama", _pissa_converted),
    "llama_tied_embed_lora": _simple("llama_tied", 20, r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"]),
    "llama_tied_lm_head_lora": _simple("llama_tied", 21, r=8, lora_alpha=16, target_modules=["lm_head", "v_proj"]),
    "gpt2_tied_embed_lora": _simple("gpt2", 22, r=8, lora_alpha=16, target_modules=["wte", "c_fc"]),
    # refused inputs
    "llama_pissa_unconverted": AdapterRecipe("llama", _pissa_unconverted),
    "llama_ia3": AdapterRecipe(
        "llama",
        _non_lora(
            lambda: IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"],
                feedforward_modules=["down_proj"],
                task_type="CAUSAL_LM",
            )
        ),
    ),
    "llama_lokr": AdapterRecipe(
        "llama",
        _non_lora(
            lambda: LoKrConfig(
                r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM"
            )
        ),
    ),
}


class Zoo:
    """Builds bases and adapters on first request, once per session, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def base(self, kind: str) -> Path:
        key = f"base/{kind}"
        if key not in self._built:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._build_base(kind, key)
        return self._built[key]

    def _build_base(self, kind: str, key: str) -> None:
        if kind.endswith("_bf16"):
            self._built[key] = build_bf16_copy(self.base(kind[: -len("_bf16")]), self.root / key)
        else:
            self._built[key] = build_base(kind, self.root / key)

    def adapter(self, name: str) -> Path:
        key = f"adapter/{name}"
        if key not in self._built:
            recipe = ADAPTERS[name]
            base = self.base(recipe.base)
            out = self.root / key
            out.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                recipe.build(base, out)
            self._built[key] = out
        return self._built[key]


# --------------------------------------------------------------------------- merge cases

# the two tensors that a tied base shares, per base kind
TIED_PAIRS: dict[str, tuple[str, str]] = {
    "llama_tied": ("model.embed_tokens.weight", "lm_head.weight"),
    "gpt2": ("transformer.wte.weight", "lm_head.weight"),
}


@dataclass(frozen=True)
class MergeCase:
    """One manifest: adapters (recipe name, manifest weight; None = short form) on their base.

    ``oracle``:
      - ``"merge"``: PEFT's ``merge_and_unload`` on the base as loaded.
      - ``"untie_first"``: the base is tied and an adapter targets the embedding or lm_head;
        PEFT's ``merge_and_unload`` merges into the shared tensor and is wrong there
        (see test_parity.py::test_peft_merge_is_wrong_on_tied_base), so the reference is
        PEFT's merge after giving lm_head its own copy of the tensor, and the end-to-end
        oracle is the unmerged PeftModel's forward.
    """

    id: str
    adapters: tuple[tuple[str, float | None], ...]
    oracle: str = "merge"

    @property
    def recipe(self) -> AdapterRecipe:
        return ADAPTERS[self.adapters[0][0]]

    @property
    def base(self) -> str:
        return self.recipe.base

    @property
    def resize_to(self) -> int | None:
        return self.recipe.resize_to

    @property
    def vocab(self) -> int:
        return self.resize_to or VOCAB

    @property
    def tied_pair(self) -> tuple[str, str] | None:
        return TIED_PAIRS.get(self.base)


def _case(case_id: str, *adapters: tuple[str, float | None], oracle: str = "merge") -> MergeCase:
    bases = {ADAPTERS[name].base for name, _ in adapters}
    assert len(bases) == 1, f"{case_id}: adapters made for different bases {bases}"
    return MergeCase(case_id, tuple(adapters), oracle)


CASES: list[MergeCase] = [
    _case("lora", ("llama_lora", None)),  # short form in the manifest
    _case("rslora", ("llama_rslora", 1.0)),
    _case("rank_alpha_pattern", ("llama_patterns", 1.0)),
    _case("gpt2_fan_in_fan_out", ("gpt2_lora", 1.0)),
    _case("dora", ("llama_dora", 1.0)),
    _case("gpt2_dora", ("gpt2_dora", 1.0)),
    _case("embedding_lora", ("llama_embed_lora", 1.0)),
    _case("lora_bias", ("qwen2_lora_bias", 1.0)),
    _case("bias_all", ("qwen2_bias_all", 1.0)),
    _case("bias_lora_only", ("qwen2_bias_lora_only", 1.0)),
    _case("modules_to_save_lm_head", ("llama_mts_lm_head", 1.0)),
    _case("tied_modules_to_save_lm_head", ("llama_tied_mts_lm_head", 1.0)),
    _case("resized_vocab", ("llama_resized", 1.0)),
    _case("trainable_tokens_list", ("llama_tt_list", 1.0)),
    _case("trainable_tokens_dict", ("llama_tt_dict", 1.0)),
    _case("tied_trainable_tokens_list", ("llama_tied_tt_list", 1.0)),
    _case("tied_trainable_tokens_dict", ("llama_tied_tt_dict", 1.0)),
    _case("layers_to_transform", ("llama_layers_to_transform", 1.0)),
    _case("two_weighted", ("llama_lora", 0.7), ("llama_lora_b", -0.3)),
    _case("pissa_converted", ("llama_pissa_converted", 1.0)),
    _case("tied_embedding_lora", ("llama_tied_embed_lora", 1.0), oracle="untie_first"),
    _case("tied_lm_head_lora", ("llama_tied_lm_head_lora", 1.0), oracle="untie_first"),
    _case("gpt2_tied_wte_lora", ("gpt2_tied_embed_lora", 1.0), oracle="untie_first"),
]
CASES_BY_ID: dict[str, MergeCase] = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES)

# float16 output for a few cases (float32 and bfloat16 for all)
FLOAT16_CASES = ["lora", "gpt2_fan_in_fan_out", "bias_all", "two_weighted", "dora"]

# refused inputs: recipe name -> words the error message must contain (lower case)
REFUSALS: dict[str, tuple[str, ...]] = {
    "llama_pissa_unconverted": ("pissa",),
    "llama_ia3": ("ia3",),
    "llama_lokr": ("lokr",),
}
