"""The architectures the tests merge: tiny random models of transformers' own classes, and the
PEFT adapters trained on them (tests/test_architectures.py).

This list is the one source of README.md's "Supported architectures" table:
`python tests/architectures.py` prints it, `python tests/architectures.py --write` rewrites it
in README.md, and test_architectures.py checks the README matches.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN = 32
VOCAB = 96
SEED = 1234
# ids a prompt may use: clear of the special tokens of the multimodal configs below (93-95)
PROMPT_IDS = (3, 90)


def _decoder(**extra: Any) -> dict[str, Any]:
    config = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config.update(extra)
    return config


_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
_VISION.update({"image_size": 32, "patch_size": 8})


def _llava() -> dict[str, Any]:
    return {
        "text_config": _decoder(model_type="llama"),
        "vision_config": dict(_VISION, model_type="clip_vision_model"),
        "image_token_index": 95,
        "vision_feature_layer": -1,
    }


def _gemma3() -> dict[str, Any]:
    return {
        "text_config": _decoder(head_dim=8, model_type="gemma3_text"),
        "vision_config": dict(_VISION, model_type="siglip_vision_model"),
        "mm_tokens_per_image": 4,
        "image_token_index": 95,
        "boi_token_index": 93,
        "eoi_token_index": 94,
    }


def _qwen2_5_vl() -> dict[str, Any]:
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": HIDDEN}
    vision.update({"patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 8})
    return {
        "text_config": _decoder(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        "vision_config": dict(vision, fullatt_block_indexes=[0]),
        "image_token_id": 95,
        "video_token_id": 94,
        "vision_start_token_id": 93,
    }


_T5 = {"vocab_size": VOCAB, "d_model": HIDDEN, "d_kv": 8, "d_ff": 2 * HIDDEN, "num_layers": 2, "num_heads": 4}
_T5.update({"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1})
_BART = {"vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": 2, "decoder_layers": 2}
_BART.update({"encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64})
_BART.update({"max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2})
_BART.update({"decoder_start_token_id": 2})
_GPT2 = {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": 2, "n_head": 4, "n_positions": 64}
_GPT2.update({"bos_token_id": 1, "eos_token_id": 2})
_MOE = {"num_experts_per_tok": 2}


def _qwen2_moe() -> dict[str, Any]:
    return _decoder(moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4, **_MOE)


def _qwen3_moe() -> dict[str, Any]:
    return _decoder(head_dim=8, moe_intermediate_size=16, num_experts=4, **_MOE)


_BERT = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4}
_BERT.update({"intermediate_size": 2 * HIDDEN, "max_position_embeddings": 64, "pad_token_id": 0})
_DISTILBERT = {"vocab_size": VOCAB, "dim": HIDDEN, "n_layers": 2, "n_heads": 4, "hidden_dim": 2 * HIDDEN}
_DISTILBERT.update({"max_position_embeddings": 64})
_WHISPER = {"vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": 2, "decoder_layers": 2}
_WHISPER.update(
    {"encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}
)
_WHISPER.update({"num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 32})
_WHISPER.update({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1})


_SEQ2SEQ = dict(_BART)  # BART-like encoder-decoders (mBART, Pegasus, Marian)


def _jamba() -> dict[str, Any]:  # Jamba: Mamba and attention layers, MoE every other layer
    mamba = {"mamba_d_state": 8, "mamba_expand": 2, "use_mamba_kernels": False}
    periods = {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1}
    return _decoder(num_experts=4, **_MOE, **mamba, **periods)


def _falcon_h1() -> dict[str, Any]:
    mamba = {"mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8, "mamba_n_groups": 1}
    return _decoder(head_dim=8, mamba_chunk_size=8, **mamba)


def _qwen3_next() -> dict[str, Any]:
    linear = {"linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8}
    experts = {"num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}
    layers = ["linear_attention", "full_attention"]
    return _decoder(head_dim=8, linear_value_head_dim=8, layer_types=layers, **linear, **experts, **_MOE)


def _mllama() -> dict[str, Any]:
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_global_layers": 1}
    vision.update({"num_attention_heads": 2, "image_size": 32, "patch_size": 8, "vision_output_dim": 32})
    vision.update({"intermediate_layers_indices": [0], "max_num_tiles": 1, "supported_aspect_ratios": [[1, 1]]})
    text = _decoder(cross_attention_layers=[1], rope_scaling={"rope_type": "default"})
    return {"text_config": text, "vision_config": vision, "image_token_index": 95}


def _llava_next() -> dict[str, Any]:
    return dict(_llava(), image_grid_pinpoints=[[32, 32]])


def _deepseek_v3() -> dict[str, Any]:
    attention = {"kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8}
    experts = {"n_routed_experts": 4, "moe_intermediate_size": 16, "first_k_dense_replace": 1, "n_group": 1}
    return _decoder(topk_group=1, **attention, **experts, **_MOE)


def _mistral3() -> dict[str, Any]:
    vision = dict(_VISION, model_type="pixtral", head_dim=8)
    return {"text_config": _decoder(model_type="mistral"), "vision_config": vision, "image_token_index": 95}


def _qwen2_vl() -> dict[str, Any]:
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": HIDDEN, "num_heads": 2, "patch_size": 4}
    vision.update({"spatial_merge_size": 2, "temporal_patch_size": 2})
    text = _decoder(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    return {"text_config": text, "vision_config": vision, "image_token_id": 95, "video_token_id": 94}


def _qwen3_vl() -> dict[str, Any]:
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": HIDDEN}
    vision.update({"patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2})
    vision.update({"deepstack_visual_indexes": [0], "num_position_embeddings": 16})
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True}
    text = _decoder(head_dim=8, rope_scaling=rope)
    return {"text_config": text, "vision_config": vision, "image_token_id": 95, "video_token_id": 94}


def _idefics3() -> dict[str, Any]:
    return {"text_config": _decoder(model_type="llama"), "vision_config": dict(_VISION), "image_token_id": 95}


def _paligemma() -> dict[str, Any]:
    vision = dict(_VISION, model_type="siglip_vision_model", projection_dim=HIDDEN)
    text = _decoder(model_type="gemma", head_dim=8)
    return {"text_config": text, "vision_config": vision, "image_token_index": 95, "projection_dim": HIDDEN}


# A vision-language base's processor, saved beside it: a word-level tokenizer over the gate's prompts
# (the family's image tokens at the config's ids), an image processor small enough for the tiny
# vision tower, and the processor with a chat template that places the image
_WORDS = (
    "Hello ! How are you today ? What is the capital of France Write a short poem about sea . "
    "Explain in one sentence what neural network Describe this image"
).split()
_CHAT = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' }}{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ IMAGE }}{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class Processor:
    """A tiny processor of one family: its image tokens (attribute -> (token, id)), the image
    processor's class and settings, the processor's class and settings (None: the image processor
    and tokenizer are saved alone) and what the chat template puts where the image goes."""

    tokens: dict[str, tuple[str, int]]
    image_processor: tuple[str, dict[str, Any]]
    processor: tuple[str, dict[str, Any]] | None
    image: str


_PROCESSORS = {
    "llava": Processor(
        {"image_token": ("<image>", 95)},
        ("CLIPImageProcessor", {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}),
        (
            "LlavaProcessor",
            {"patch_size": 8, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},
        ),
        "<image>",
    ),
    "gemma3": Processor(
        {
            "boi_token": ("<start_of_image>", 93),
            "eoi_token": ("<end_of_image>", 94),
            "image_token": ("<image_soft_token>", 95),
        },
        ("Gemma3ImageProcessor", {"size": {"height": 32, "width": 32}}),
        ("Gemma3Processor", {"image_seq_length": 4}),
        "<start_of_image>",
    ),
    "mistral3": Processor(
        {"image_token": ("[IMG]", 95), "image_break_token": ("[IMG_BREAK]", 94), "image_end_token": ("[IMG_END]", 93)},
        ("PixtralImageProcessorPil", {"size": {"longest_edge": 32}, "patch_size": {"height": 8, "width": 8}}),
        None,  # transformers' PixtralProcessor needs torchvision: image processor and tokenizer alone
        "[IMG]",
    ),
    # transformers' Qwen2.5-VL processor needs torchvision (its video processor): the image processor
    # and the tokenizer are saved alone, as a checkpoint without processor_config.json has them
    "qwen2_5_vl": Processor(
        {
            "vision_start_token": ("<|vision_start|>", 93),
            "video_token": ("<|video_pad|>", 94),
            "image_token": ("<|image_pad|>", 95),
            "vision_end_token": ("<|vision_end|>", 92),
        },
        (
            "Qwen2VLImageProcessor",
            {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 256, "max_pixels": 256},
        ),
        None,
        "<|vision_start|><|image_pad|><|vision_end|>",
    ),
}


def _save_processor(spec: Processor, out: Path) -> None:
    """The family's tokenizer, image processor and processor, saved into `out` by save_pretrained."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    taken = {i for _, i in spec.tokens.values()}
    free = (i for i in range(len(vocab), VOCAB) if i not in taken)
    vocab.update({f"<unused{i}>": i for i in free})
    vocab.update(dict(spec.tokens.values()))
    assert sorted(vocab.values()) == list(range(VOCAB))
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece(prefix="##")
    raw.add_special_tokens([t for t in vocab if t.startswith("<")])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={name: token for name, (token, _) in spec.tokens.items()},
    )
    template = _CHAT.replace("IMAGE", repr(spec.image))
    name, settings = spec.image_processor
    images = getattr(transformers, name)(**settings)
    if spec.processor is None:
        tokenizer.chat_template = template
        tokenizer.save_pretrained(out)
        images.save_pretrained(out)
        return
    name, settings = spec.processor
    getattr(transformers, name)(images, tokenizer, chat_template=template, **settings).save_pretrained(out)


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class Arch:
    """One base: a transformers class and the config of a tiny random model of it."""

    model_class: str
    config: Callable[[], dict[str, Any]]
    task: str = "causal LM"
    module_names: bool = False  # stored under the module names (transformers 5's layout), not save_pretrained's
    processor: Processor | None = None  # saved beside it: tokenizer, image processor (and processor)
    portable: bool = True  # False: merged with `output.compat: false`


ARCHES: dict[str, Arch] = {
    "llama": Arch("LlamaForCausalLM", lambda: _decoder()),
    "llama_tied": Arch("LlamaForCausalLM", lambda: _decoder(tie_word_embeddings=True)),
    "mistral": Arch("MistralForCausalLM", lambda: _decoder()),
    "qwen2": Arch("Qwen2ForCausalLM", lambda: _decoder()),
    "qwen3": Arch("Qwen3ForCausalLM", lambda: _decoder(head_dim=8)),
    "gemma": Arch("GemmaForCausalLM", lambda: _decoder(head_dim=8)),
    "gemma2": Arch("Gemma2ForCausalLM", lambda: _decoder(head_dim=8)),
    "gemma3_text": Arch("Gemma3ForCausalLM", lambda: _decoder(head_dim=8)),
    "phi": Arch("PhiForCausalLM", lambda: _decoder()),
    "phi3": Arch("Phi3ForCausalLM", lambda: _decoder()),
    "gpt2": Arch("GPT2LMHeadModel", lambda: dict(_GPT2)),
    "gptj": Arch("GPTJForCausalLM", lambda: dict(_GPT2, rotary_dim=4)),
    "gpt_neox": Arch("GPTNeoXForCausalLM", lambda: _decoder(num_key_value_heads=None)),
    "falcon": Arch(
        "FalconForCausalLM",
        lambda: {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4},
    ),
    "bloom": Arch("BloomForCausalLM", lambda: {"vocab_size": VOCAB, "hidden_size": HIDDEN, "n_layer": 2, "n_head": 4}),
    "opt": Arch(
        "OPTForCausalLM",
        lambda: _decoder(ffn_dim=2 * HIDDEN, word_embed_proj_dim=HIDDEN, num_key_value_heads=None),
    ),
    "olmo": Arch("OlmoForCausalLM", lambda: _decoder()),
    "olmo2": Arch("Olmo2ForCausalLM", lambda: _decoder()),
    "granite": Arch("GraniteForCausalLM", lambda: _decoder()),
    "stablelm": Arch("StableLmForCausalLM", lambda: _decoder()),
    "cohere": Arch("CohereForCausalLM", lambda: _decoder()),
    "starcoder2": Arch("Starcoder2ForCausalLM", lambda: _decoder()),
    "qwen2_moe": Arch("Qwen2MoeForCausalLM", lambda: _qwen2_moe()),
    "qwen3_moe": Arch("Qwen3MoeForCausalLM", lambda: _qwen3_moe()),
    "mixtral": Arch("MixtralForCausalLM", lambda: _decoder(num_local_experts=4, **_MOE)),
    "gpt_oss": Arch(
        "GptOssForCausalLM",
        lambda: _decoder(head_dim=8, num_local_experts=4, layer_types=["full_attention"] * 2, **_MOE),
    ),
    "llava": Arch("LlavaForConditionalGeneration", _llava, "image-text-to-text", processor=_PROCESSORS["llava"]),
    "llava_v5": Arch("LlavaForConditionalGeneration", _llava, "image-text-to-text", module_names=True),
    "gemma3": Arch("Gemma3ForConditionalGeneration", _gemma3, "image-text-to-text", processor=_PROCESSORS["gemma3"]),
    "qwen2_5_vl": Arch(
        "Qwen2_5_VLForConditionalGeneration", _qwen2_5_vl, "image-text-to-text", processor=_PROCESSORS["qwen2_5_vl"]
    ),
    "mixtral_v5": Arch("MixtralForCausalLM", lambda: _decoder(num_local_experts=4, **_MOE), module_names=True),
    "qwen2_moe_v5": Arch("Qwen2MoeForCausalLM", lambda: _qwen2_moe(), module_names=True),
    "qwen3_moe_v5": Arch("Qwen3MoeForCausalLM", lambda: _qwen3_moe(), module_names=True),
    "t5": Arch("T5ForConditionalGeneration", lambda: dict(_T5), "seq2seq LM"),
    "bart": Arch("BartForConditionalGeneration", lambda: dict(_BART), "seq2seq LM"),
    "llama_seq_cls": Arch("LlamaForSequenceClassification", lambda: _decoder(num_labels=3), "sequence classification"),
    "qwen2_seq_cls": Arch("Qwen2ForSequenceClassification", lambda: _decoder(num_labels=3), "sequence classification"),
    "llama_token_cls": Arch("LlamaForTokenClassification", lambda: _decoder(num_labels=5), "token classification"),
    "smollm3": Arch("SmolLM3ForCausalLM", lambda: _decoder()),
    "glm4": Arch("Glm4ForCausalLM", lambda: _decoder(head_dim=8)),
    "olmoe": Arch("OlmoeForCausalLM", lambda: _decoder(num_experts=4, **_MOE)),
    "granitemoe": Arch("GraniteMoeForCausalLM", lambda: _decoder(num_local_experts=4, **_MOE)),
    "phimoe": Arch("PhimoeForCausalLM", lambda: _decoder(num_local_experts=4, **_MOE)),
    "deepseek_v3": Arch("DeepseekV3ForCausalLM", _deepseek_v3),
    "mistral3": Arch(
        "Mistral3ForConditionalGeneration", _mistral3, "image-text-to-text", processor=_PROCESSORS["mistral3"]
    ),
    "qwen2_vl": Arch(
        "Qwen2VLForConditionalGeneration", _qwen2_vl, "image-text-to-text", processor=_PROCESSORS["qwen2_5_vl"]
    ),
    "qwen3_vl": Arch("Qwen3VLForConditionalGeneration", _qwen3_vl, "image-text-to-text"),
    "idefics3": Arch("Idefics3ForConditionalGeneration", _idefics3, "image-text-to-text"),
    "paligemma": Arch("PaliGemmaForConditionalGeneration", _paligemma, "image-text-to-text"),
    "whisper": Arch("WhisperForConditionalGeneration", lambda: dict(_WHISPER), "speech seq2seq"),
    "bert_seq_cls": Arch("BertForSequenceClassification", lambda: dict(_BERT, num_labels=3), "sequence classification"),
    "roberta_seq_cls": Arch(
        "RobertaForSequenceClassification",
        lambda: dict(_BERT, num_labels=3, pad_token_id=1, max_position_embeddings=70),
        "sequence classification",
    ),
    "deberta_v2_seq_cls": Arch(
        "DebertaV2ForSequenceClassification", lambda: dict(_BERT, num_labels=3), "sequence classification"
    ),
    "modernbert_seq_cls": Arch(
        "ModernBertForSequenceClassification",
        lambda: dict(_BERT, num_labels=3, global_attn_every_n_layers=1, local_attention=8),
        "sequence classification",
    ),
    "distilbert_token_cls": Arch(
        "DistilBertForTokenClassification", lambda: dict(_DISTILBERT, num_labels=5), "token classification"
    ),
    "bert": Arch("BertModel", lambda: dict(_BERT), "feature extraction"),
    "exaone4": Arch("Exaone4ForCausalLM", lambda: _decoder(head_dim=8)),
    "qwen3_next": Arch("Qwen3NextForCausalLM", _qwen3_next),
    "jamba": Arch("JambaForCausalLM", _jamba),
    "falcon_h1": Arch("FalconH1ForCausalLM", _falcon_h1),
    "mamba": Arch(
        "MambaForCausalLM",
        lambda: {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2, "state_size": 8, "expand": 2},
    ),
    "llava_next": Arch("LlavaNextForConditionalGeneration", _llava_next, "image-text-to-text"),
    "mllama": Arch("MllamaForConditionalGeneration", _mllama, "image-text-to-text"),
    "mt5": Arch("MT5ForConditionalGeneration", lambda: dict(_T5), "seq2seq LM"),
    "mbart": Arch("MBartForConditionalGeneration", lambda: dict(_SEQ2SEQ), "seq2seq LM"),
    "pegasus": Arch(
        "PegasusForConditionalGeneration",
        lambda: dict(_SEQ2SEQ, pad_token_id=0, decoder_start_token_id=0),
        "seq2seq LM",
    ),
    "marian": Arch("MarianMTModel", lambda: dict(_SEQ2SEQ, pad_token_id=1, decoder_start_token_id=1), "seq2seq LM"),
    "bart_seq_cls": Arch("BartForSequenceClassification", lambda: dict(_BART, num_labels=3), "sequence classification"),
    "gpt2_seq_cls": Arch(
        "GPT2ForSequenceClassification", lambda: dict(_GPT2, num_labels=3, pad_token_id=0), "sequence classification"
    ),
    "electra_seq_cls": Arch(
        "ElectraForSequenceClassification",
        lambda: dict(_BERT, embedding_size=HIDDEN, num_labels=2),
        "sequence classification",
    ),
    "xlm_roberta_token_cls": Arch(
        "XLMRobertaForTokenClassification",
        lambda: dict(_BERT, num_labels=4, pad_token_id=1, max_position_embeddings=70),
        "token classification",
    ),
    "bert_qa": Arch("BertForQuestionAnswering", lambda: dict(_BERT), "question answering"),
    "t5_encoder": Arch("T5EncoderModel", lambda: dict(_T5), "feature extraction"),
}


@dataclass(frozen=True)
class Case:
    """One adapter on one base, trained as PEFT would save it (LoraConfig's arguments)."""

    id: str
    arch: str
    lora: dict[str, Any] = field(default_factory=dict)
    what: str = "all-linear LoRA"

    @property
    def task_type(self) -> str:
        return self.lora.get("task_type", "CAUSAL_LM")


def _all_linear(arch: str, **lora: Any) -> Case:
    return Case(arch, arch, {"target_modules": "all-linear", **lora})


# PEFT 0.21 turns all-linear on these into target_parameters on the fused experts and the router
# (ParamWrapper; the experts' on-disk tensors one by one, or fused in module-name checkpoints)
MOE_ALL_LINEAR = ("mixtral", "mixtral_v5", "qwen3_moe", "qwen3_moe_v5")
_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# PEFT cannot run all-linear on these: PhiMoE's router returns a tuple its LoRA layer cannot wrap;
# PEFT refuses LoRA on a Mamba mixer's out_proj and conv1d
NOT_ALL_LINEAR = ("phimoe", "mamba", "falcon_h1", "jamba")


def _stored(arch: str) -> str:
    return "experts fused on disk" if ARCHES[arch].module_names or arch == "gpt_oss" else "experts one by one on disk"


def _moe_all_linear(arch: str) -> Case:
    what = f"all-linear LoRA, which PEFT makes target_parameters on the experts and router ({_stored(arch)})"
    return Case(arch, arch, {"target_modules": "all-linear"}, what)


def _on_experts(case_id: str, arch: str, router: str) -> Case:
    lora = {"target_modules": "all-linear", "target_parameters": [*_EXPERTS, router]}
    return Case(case_id, arch, lora, f"all-linear LoRA + target_parameters on the experts and router ({_stored(arch)})")


# LoRA on the vision tower (and Qwen2.5-VL's patch merger) only: what only an image prompt runs
VISION_TOWER = {
    "llava": r".*vision_tower.*\.(q_proj|v_proj|fc1)",
    "gemma3": r".*vision_tower.*\.(q_proj|v_proj|fc1)",
    "qwen2_5_vl": r".*visual\.(blocks\.\d+\.attn\.(qkv|proj)|merger\.mlp\.0)",
    "mistral3": r".*vision_tower.*\.(q_proj|v_proj|gate_proj)",
    "qwen2_vl": r".*visual\.(blocks\.\d+\.attn\.(qkv|proj)|merger\.mlp\.0)",
}

CASES: list[Case] = [
    *(
        _all_linear(a)
        for a in ARCHES
        if ARCHES[a].task == "causal LM" and a not in ("llama_tied", "qwen2_moe_v5", *NOT_ALL_LINEAR, *MOE_ALL_LINEAR)
    ),
    *(_moe_all_linear(a) for a in MOE_ALL_LINEAR),
    _on_experts("qwen2_moe-experts", "qwen2_moe", "mlp.gate.weight"),
    _on_experts("qwen2_moe_v5", "qwen2_moe_v5", "mlp.gate.weight"),
    _on_experts("gpt_oss-experts", "gpt_oss", "mlp.router.weight"),
    Case(
        "llama-embed-head",
        "llama",
        {"target_modules": ["embed_tokens", "q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
        "embedding LoRA + modules_to_save lm_head",
    ),
    Case("llama_tied-embed", "llama_tied", {"target_modules": ["embed_tokens", "q_proj"]}, "LoRA on a tied embedding"),
    Case("gpt2-embed", "gpt2", {"target_modules": ["wte", "c_attn"]}, "LoRA on a tied embedding"),
    Case(
        "gpt_neox-head",
        "gpt_neox",
        {"target_modules": ["query_key_value"], "modules_to_save": ["embed_out"]},
        "modules_to_save on the renamed head",
    ),
    _all_linear("llava"),
    _all_linear("gemma3"),
    _all_linear("qwen2_5_vl"),
    *(
        Case(f"{arch}-vision", arch, {"target_modules": targets}, "vision-tower LoRA, run by the gate's image prompt")
        for arch, targets in VISION_TOWER.items()
    ),
    Case(
        "llava-language",
        "llava",
        {"target_modules": r".*language_model.*\.(q_proj|v_proj|down_proj)"},
        "language-model LoRA",
    ),
    Case(
        "llava_v5",
        "llava_v5",
        {"target_modules": r".*language_model.*\.(q_proj|v_proj|down_proj)"},
        "language-model LoRA, module names on disk",
    ),
    _all_linear("t5", task_type="SEQ_2_SEQ_LM"),
    Case(
        "t5-head", "t5", {"target_modules": ["q", "lm_head"], "task_type": "SEQ_2_SEQ_LM"}, "LoRA on the tied lm_head"
    ),
    _all_linear("bart", task_type="SEQ_2_SEQ_LM"),
    Case(
        "llama_seq_cls",
        "llama_seq_cls",
        {"target_modules": "all-linear", "task_type": "SEQ_CLS"},
        "all-linear LoRA + modules_to_save score",
    ),
    Case(
        "qwen2_seq_cls",
        "qwen2_seq_cls",
        {"target_modules": "all-linear", "task_type": "SEQ_CLS"},
        "all-linear LoRA + modules_to_save score",
    ),
    Case(
        "llama_token_cls", "llama_token_cls", {"target_modules": ATTENTION, "task_type": "TOKEN_CLS"}, "attention LoRA"
    ),
    # PhiMoE's router returns a tuple, which PEFT's LoRA layer cannot wrap (its forward fails, so
    # no such adapter can be trained): attention and the experts' matrices only
    Case("phimoe", "phimoe", {"target_modules": [*ATTENTION, "w1", "w2", "w3"]}, "attention and expert LoRA"),
    _all_linear("mistral3"),
    _all_linear("qwen2_vl"),
    _all_linear("qwen3_vl"),
    _all_linear("idefics3"),
    _all_linear("paligemma"),
    Case(
        "whisper",
        "whisper",
        {"target_modules": ["q_proj", "v_proj", "fc1"], "task_type": None},  # as PEFT's Whisper recipe
        "encoder and decoder LoRA",
    ),
    *(
        Case(
            a,
            a,
            {"target_modules": "all-linear", "task_type": "SEQ_CLS"},
            "all-linear LoRA + modules_to_save classifier",
        )
        for a in ("bert_seq_cls", "roberta_seq_cls", "modernbert_seq_cls")
    ),
    Case(
        "deberta_v2_seq_cls",
        "deberta_v2_seq_cls",
        {"target_modules": ["query_proj", "value_proj"], "task_type": "SEQ_CLS"},
        "attention LoRA + modules_to_save classifier",
    ),
    Case(
        "distilbert_token_cls",
        "distilbert_token_cls",
        {"target_modules": ["q_lin", "v_lin", "ffn.lin1"], "task_type": "TOKEN_CLS"},
        "attention and FFN LoRA + modules_to_save classifier",
    ),
    Case("bert", "bert", {"target_modules": ["query", "value"], "task_type": "FEATURE_EXTRACTION"}, "attention LoRA"),
    *(
        Case(a, a, {"target_modules": ["q_proj", "v_proj", "in_proj", "x_proj"]}, "attention and mixer LoRA")
        for a in ("mamba", "falcon_h1", "jamba")
    ),
    _all_linear("llava_next"),
    Case(
        "mllama",
        "mllama",
        {"target_modules": r".*language_model.*\.(q_proj|v_proj|down_proj)"},
        "language-model LoRA (its cross-attention too)",
    ),
    *(_all_linear(a, task_type="SEQ_2_SEQ_LM") for a in ("mt5", "mbart", "pegasus", "marian")),
    Case(
        "bart_seq_cls",
        "bart_seq_cls",
        {"target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"},
        "attention LoRA + modules_to_save classification head",
    ),
    Case(
        "gpt2_seq_cls", "gpt2_seq_cls", {"target_modules": ["c_attn"], "task_type": "SEQ_CLS"}, "attention LoRA + score"
    ),
    Case(
        "electra_seq_cls",
        "electra_seq_cls",
        {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
        "attention LoRA + modules_to_save classifier",
    ),
    Case(
        "xlm_roberta_token_cls",
        "xlm_roberta_token_cls",
        {"target_modules": ["query", "value"], "task_type": "TOKEN_CLS"},
        "attention LoRA + modules_to_save classifier",
    ),
    Case(
        "bert_qa",
        "bert_qa",
        {"target_modules": ["query", "value"], "task_type": "QUESTION_ANS"},
        "attention LoRA + modules_to_save qa_outputs",
    ),
    Case(
        "t5_encoder",
        "t5_encoder",
        {"target_modules": ["q", "v", "wi"], "task_type": "FEATURE_EXTRACTION"},
        "attention and FFN LoRA",
    ),
]
CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "two cases share an id"


def build_base(arch: str, out: Path) -> Path:
    """A tiny random model of `arch`, norms and biases perturbed too, saved by save_pretrained (its
    on-disk layout is transformers' own: legacy key names where the class converts them)."""
    import torch
    import transformers

    spec = ARCHES[arch]
    cls = getattr(transformers, spec.model_class)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(cls.config_class(**spec.config()))
        gen = torch.Generator().manual_seed(SEED)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 1:
                    param.add_(0.1 * torch.randn(param.shape, generator=gen))
                elif not param.any():  # a weight initialised to zeros (Gemma 3's image projection) passes nothing on
                    param.copy_(0.02 * torch.randn(param.shape, generator=gen))
        model.save_pretrained(out)
        if spec.module_names:  # the state dict as the model holds it: transformers 5's names and fused experts
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            for tied in model.all_tied_weights_keys:  # stored once, under the name it is tied to
                state.pop(tied, None)
            (out / "model.safetensors").unlink()
            save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        if spec.processor is not None:
            _save_processor(spec.processor, out)
    return out


def build_adapter(case: Case, base: Path, out: Path) -> Path:
    """PEFT's adapter for `case` on `base`: init_lora_weights=False, so that it changes the model;
    a modules_to_save copy is perturbed so that it changes it too."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    cls = getattr(transformers, ARCHES[case.arch].model_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(base)
        torch.manual_seed(SEED + 1)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **{"task_type": "CAUSAL_LM", **case.lora})
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(SEED + 2)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".modules_to_save." in name:
                    param.add_(0.5 * torch.randn(param.shape, generator=gen))
        peft_model.save_pretrained(out)
    return out


README_START = "<!-- architectures: generated by `python tests/architectures.py --write` -->"
README_END = "<!-- end of architectures -->"


def readme_table() -> str:
    """The README's table of the tested architectures, from CASES."""
    rows = ["| base | transformers class | task | adapters tested |", "| --- | --- | --- | --- |"]
    by_arch: dict[str, list[str]] = {}
    for case in CASES:
        by_arch.setdefault(case.arch, []).append(case.what)
    for arch, whats in by_arch.items():
        spec = ARCHES[arch]
        rows.append(f"| `{arch}` | `{spec.model_class}` | {spec.task} | {'; '.join(whats)} |")
    return "\n".join([README_START, *rows, README_END])


def readme_section(text: str) -> str | None:
    start, end = text.find(README_START), text.find(README_END)
    return text[start : end + len(README_END)] if 0 <= start < end else None


if __name__ == "__main__":
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if sys.argv[1:] == ["--write"]:
        text = readme.read_text()
        old = readme_section(text)
        if old is None:
            sys.exit(f"{readme}: no {README_START} ... {README_END} section to rewrite")
        readme.write_text(text.replace(old, readme_table()))
    else:
        print(readme_table())
