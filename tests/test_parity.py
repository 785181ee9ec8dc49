"""Parity with PEFT: every output tensor against PEFT's own merge, and logits end to end.

Each equality check has a negative control: the unmerged base must fail the same check, so a
merge that silently did nothing (or a comparison that cannot fail) is caught.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from builders import CASES, CASES_BY_ID, FLOAT16_CASES, load_base
from helpers import (
    DTYPES,
    INDEX_NAME,
    LOGITS_ATOL_REL,
    load_output,
    logits,
    shard_files,
    shard_size_for,
    violations,
)

TENSOR_PARAMS = [
    pytest.param(c.id, d, id=f"{c.id}-{d}")
    for c in CASES
    for d in ["float32", "bfloat16"] + (["float16"] if c.id in FLOAT16_CASES else [])
]
CASE_IDS = [c.id for c in CASES]
TIED_EXCEPTIONS = [c.id for c in CASES if c.oracle == "untie_first"]


def _fmt(found) -> str:
    return "\n".join(str(v) for v in found[:10]) + (f"\n... and {len(found) - 10} more" if len(found) > 10 else "")


@pytest.mark.parametrize("case,dtype_name", TENSOR_PARAMS, indirect=["case"])
def test_tensors_match_peft(case, dtype_name, merger, oracle):
    dtype = DTYPES[dtype_name]
    out = merger.output(case, dtype_name)
    ours = load_output(out)
    ref = oracle.reference(case, dtype_name)
    base = oracle.base_tensors(case)

    assert set(ours) == set(ref), f"missing {sorted(set(ref) - set(ours))}, unexpected {sorted(set(ours) - set(ref))}"
    wrong_dtype = {k: v.dtype for k, v in ours.items() if v.dtype != dtype}
    assert not wrong_dtype, f"not {dtype}: {wrong_dtype}"
    wrong_shape = {k: (tuple(ours[k].shape), tuple(ref[k].shape)) for k in ref if ours[k].shape != ref[k].shape}
    assert not wrong_shape, f"(ours, PEFT) shapes differ: {wrong_shape}"

    mags = oracle.magnitudes(case)
    found = violations(ours, ref, mags, dtype)
    assert not found, f"{len(found)} tensor(s) beyond the {dtype_name} tolerance of PEFT:\n{_fmt(found)}"

    # tensors that no adapter touches are the base's, converted once (bit for bit)
    untouched = [k for k in ref if k in base and torch.equal(ref[k], base[k].to(dtype))]
    altered = [k for k in untouched if not torch.equal(ours[k], base[k].to(dtype))]
    assert not altered, f"untouched tensors differ from the base: {altered}"
    assert len(untouched) < len(ref), "negative control: the adapter changes no tensor"

    # negative control: the unmerged base, in the output dtype, must fail the same comparison
    unmerged = {k: base[k].to(dtype) for k in ref if k in base and base[k].shape == ref[k].shape}
    control = violations(unmerged, {k: ref[k] for k in unmerged}, mags, dtype)
    assert control, "negative control: the unmerged base passes the comparison"


@pytest.mark.parametrize("case", CASE_IDS, indirect=True)
def test_shards_and_index(case, merger):
    """float32 outputs are written with a small max_shard_size: several shards plus an index."""
    assert shard_size_for("float32") is not None
    out = merger.output(case, "float32")
    index = json.loads((out / INDEX_NAME).read_text())
    shards = shard_files(out)
    n = len(shards)
    assert n > 1, f"expected several shards with max_shard_size={shard_size_for('float32')}"
    assert sorted(p.name for p in shards) == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    tensors = load_output(out)  # also checks that the index and the shard headers agree
    assert set(index["weight_map"]) == set(tensors)


@pytest.mark.parametrize("case", CASE_IDS, indirect=True)
def test_config_tying_and_vocab(case, merger, oracle):
    out = merger.output(case, "float32")
    config = AutoConfig.from_pretrained(out)
    untied = oracle.expect_untied(case)
    expected_tie = case.tied_pair is not None and not untied
    assert config.get_text_config().tie_word_embeddings is expected_tie
    raw = json.loads((out / "config.json").read_text())
    if case.tied_pair is not None and untied:
        assert raw.get("tie_word_embeddings") is False, "an untied output must say so explicitly"
    assert config.get_text_config().vocab_size == case.vocab
    ours = load_output(out)
    if case.tied_pair is not None:
        embed, head = case.tied_pair
        assert (head in ours) is untied
        assert embed in ours


@pytest.mark.parametrize("case", CASE_IDS, indirect=True)
def test_logits_match_unmerged_peft(case, merger, oracle):
    """The float32 output, loaded by transformers, behaves like the unmerged PeftModel."""
    out = merger.output(case, "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = oracle.input_ids(case)
    ref = oracle.unmerged_logits(case)
    ours = logits(model, ids)
    atol = LOGITS_ATOL_REL * max(1.0, float(ref.abs().max()))
    diff = float((ours - ref).abs().max())
    assert diff <= atol, f"max |logit diff| {diff:.3e} > {atol:.1e}"

    # negative control: the base model's logits are far from the adapted model's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_model = load_base(oracle.zoo.base(case.base), resize_to=case.resize_to)
    control = float((logits(base_model, ids) - ref).abs().max())
    assert control > atol, f"negative control: base logits within {atol:.1e} of the adapted model"


@pytest.mark.parametrize("case", TIED_EXCEPTIONS, indirect=True)
def test_tied_exception_output_is_untied(case, merger, oracle):
    """Tied base + LoRA on the embedding or lm_head: both tensors stored, untied config."""
    out = merger.output(case, "float32")
    ours = load_output(out)
    embed, head = case.tied_pair
    assert embed in ours and head in ours
    assert not torch.equal(ours[embed], ours[head])
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings") is False


@pytest.mark.parametrize("case", TIED_EXCEPTIONS, indirect=True)
def test_peft_merge_is_wrong_on_tied_base(case, oracle):
    """Why these cases deviate from PEFT: its merge_and_unload on the tied base writes the
    embedding (or lm_head) delta into the shared tensor, so the merged model's logits are far
    from the unmerged PeftModel's. Our reference unties first, which matches the forward."""
    ids = oracle.input_ids(case)
    ref = oracle.unmerged_logits(case)
    atol = LOGITS_ATOL_REL * max(1.0, float(ref.abs().max()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, names = oracle.peft_model(case, torch.float32)
        peft_merged = model.merge_and_unload(adapter_names=names)
        peft_diff = float((logits(peft_merged, ids) - ref).abs().max())
        untied_model, names = oracle.peft_model(case, torch.float32, untie=True)
        untied_diff = float((logits(untied_model.merge_and_unload(adapter_names=names), ids) - ref).abs().max())
    assert peft_diff > 1000 * atol, f"PEFT's tied merge is off by only {peft_diff:.3e}"
    assert untied_diff <= atol, f"untie-first merge off by {untied_diff:.3e}"


def test_case_table_is_consistent():
    assert set(TIED_EXCEPTIONS) <= set(CASES_BY_ID)
    assert all(CASES_BY_ID[c].tied_pair for c in TIED_EXCEPTIONS)
