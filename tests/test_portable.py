"""Issue 19, part 1: a portable release. config.json and tokenizer_config.json carry transformers 4's
layout beside transformers 5's (`output.compat`, on by default), transformers 5 reads them exactly as
it read the source, and the gate's packaging check finds any disagreement between the two layouts.
(The gate's seeded defects for it are in test_gate.py; loading in transformers 4 itself is in
test_runtimes.py.)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from mergekit_lite import run_merge
from mergekit_lite.gate.portable import config_disagreements, tokenizer_config_problems
from mergekit_lite.plan.compat import portable_config, portable_tokenizer_config

from release_builders import build_adapter, build_chat_base, build_tokenizer, sha256, write_manifest

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 100000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
}


def v5_config(rope: dict) -> dict:
    """A Llama config.json as transformers 5 saves it (rope in `rope_parameters` only)."""
    from transformers import LlamaConfig

    doc = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(rope), dtype="bfloat16").to_dict()
    assert "rope_theta" not in doc and "rope_scaling" not in doc
    return doc


def read_v5(doc: dict) -> dict:
    """What transformers 5 makes of a config.json's RoPE."""
    from transformers import LlamaConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(LlamaConfig.from_dict(doc).rope_parameters)


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_portable_config_reads_alike(kind: str) -> None:
    source = v5_config(ROPES[kind])
    portable = portable_config(source)
    assert portable["rope_theta"] == ROPES[kind]["rope_theta"]
    assert portable["torch_dtype"] == portable["dtype"]
    if kind == "default":
        assert portable.get("rope_scaling") is None
    else:
        assert portable["rope_scaling"]["rope_type"] == kind and "rope_theta" not in portable["rope_scaling"]
    # transformers 5 reads the portable file, and the 4.x keys alone, as it read the source
    legacy_only = {k: v for k, v in portable.items() if k != "rope_parameters"}
    assert read_v5(portable) == read_v5(legacy_only) == read_v5(source)
    assert config_disagreements(portable)[0] == []
    # negative controls: the source itself, and a value changed in one layout only
    assert read_v5({k: v for k, v in source.items() if k != "rope_parameters"}) != read_v5(source)
    assert any("rope.rope_theta" in p for p in config_disagreements(source)[0])
    if kind != "default":
        changed = {**portable, "rope_scaling": {**portable["rope_scaling"], "factor": 3.0}}
        assert [p for p in config_disagreements(changed)[0] if "rope.factor" in p]


def test_mrope_of_the_default_type_goes_to_rope_scaling() -> None:
    """Qwen3-VL's text config, as transformers 5 saves it: M-RoPE with `rope_type: default` and its
    `mrope_section` / `mrope_interleaved` beside. transformers 4.57 reads those from `rope_scaling`
    (its own default section otherwise), so they must be written there although the type is
    `default`; before, the release shipped without them and the gate's agreement check refused it."""
    from transformers import Qwen3VLConfig

    rope = {"mrope_interleaved": True, "mrope_section": [1, 1, 2], "rope_theta": 500000.0, "rope_type": "default"}
    text = {"hidden_size": 32, "num_attention_heads": 4, "head_dim": 8, "rope_parameters": rope}
    source = Qwen3VLConfig(text_config=text).to_dict()
    portable = portable_config(source)
    scaling = portable["text_config"]["rope_scaling"]
    assert scaling == {"mrope_interleaved": True, "mrope_section": [1, 1, 2], "rope_type": "default"}
    assert portable["text_config"]["rope_theta"] == 500000.0
    assert config_disagreements(portable)[0] == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dict(Qwen3VLConfig.from_dict(portable).text_config.rope_parameters) == rope  # v5 reads it alike
    # negative control: the section in transformers 5's layout only
    dropped = {**portable, "text_config": {**portable["text_config"], "rope_scaling": None}}
    assert any("rope.mrope_section" in p for p in config_disagreements(dropped)[0])


def test_nested_rope_parameters_are_left_alone() -> None:
    nested = {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}}
    assert portable_config(nested) == nested
    problems, compared = config_disagreements(nested)
    assert problems == [] and "not compared" in compared[0]


def test_portable_tokenizer_config(tmp_path: Path) -> None:
    """The v5 save of a tokenizer with an extra special token becomes one transformers 4 reads; v5
    reads it as before (same class of tokenizer, same specials, same encodings)."""
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tokenizer.save_pretrained(tmp_path / "v5")
    doc = json.loads((tmp_path / "v5" / "tokenizer_config.json").read_text())
    template = (tmp_path / "v5" / "chat_template.jinja").read_text()
    assert len(tokenizer_config_problems(doc, template)) == 3  # negative control: class, artefacts, list
    portable = portable_tokenizer_config(doc, template)
    assert tokenizer_config_problems(portable, template) == []
    assert portable["additional_special_tokens"] == ["<|tool|>"] and portable["chat_template"] == template
    (tmp_path / "portable").mkdir()
    for name in ("tokenizer.json", "chat_template.jinja"):
        (tmp_path / "portable" / name).write_bytes((tmp_path / "v5" / name).read_bytes())
    (tmp_path / "portable" / "tokenizer_config.json").write_text(json.dumps(portable))
    a, b = (AutoTokenizer.from_pretrained(tmp_path / d) for d in ("v5", "portable"))
    assert type(a) is type(b) and a.special_tokens_map == b.special_tokens_map
    assert a.all_special_ids == b.all_special_ids and "<|tool|>" in b.all_special_tokens
    text = "Hello <|tool|> the cat"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    chat = [{"role": "user", "content": text}]
    assert a.apply_chat_template(chat) == b.apply_chat_template(chat)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("portable-inputs")
    base = build_chat_base(root / "base", build_tokenizer())
    adapter = build_adapter(base, root / "adapter", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, adapter


@pytest.mark.parametrize("compat", [True, False])
def test_release_layout(inputs, tmp_path: Path, compat: bool) -> None:
    """By default the release is portable and the gate proves it; `output.compat: false` ships the
    source's layout (the negative control: the 4.x keys come from compat, not from the base)."""
    base, adapter = inputs
    manifest = write_manifest(tmp_path, base, [adapter], "bfloat16", compat=compat, verify={"max_new_tokens": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run_merge(manifest)
    config = json.loads((out / "config.json").read_text())
    verification = json.loads((out / "verification.json").read_text())
    rows = {c["name"]: c for c in verification["checks"]}
    assert verification["passed"] is True
    if compat:
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
        assert config["torch_dtype"] == config["dtype"] == "bfloat16"
        assert rows["config.json: transformers 4 keys agree with v5's"]["passed"]
        assert rows["tokenizer_config.json readable by transformers 4"]["passed"]
        assert "rope.rope_theta" in rows["config.json: transformers 4 keys agree with v5's"]["detail"]
    else:
        assert "rope_theta" not in config and "torch_dtype" not in config
        assert sha256(out / "tokenizer_config.json") == sha256(base / "tokenizer_config.json")
        assert not [name for name in rows if "transformers 4" in name]
        assert "`output.compat` is false" in verification["skipped"]["packaging: transformers 4 layout"]
