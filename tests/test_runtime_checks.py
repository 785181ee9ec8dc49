"""Issue 19, part 2: `verify.runtimes: [ctranslate2, onnxruntime-genai]`, the Python runtimes.

CTranslate2: the release converted by its own converter and run by its Generator (float32, CPU)
gives transformers 5's logits and greedy tokens; a release whose RoPE setting CTranslate2 does not
implement fails the check naming it. onnxruntime-genai: the release exported by its model builder
(fp32, CPU) likewise; a release whose head size its attention kernel cannot run fails naming it. A
runtime not installed is refused in one line before anything is written. And a gate bug found
here: the greedy paths now stop on the release's end-of-sequence ids for both models.

Each tier is skipped when its runtime is not installed, unless MERGEKIT_LITE_RUNTIME_TESTS=1 (CI
installs both with `make test`'s extras and sets that, so CI never skips them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_lite import run_merge
from mergekit_lite.cli import main
from mergekit_lite.pipeline import GateFailed, execute, prepare, verify_release

from release_builders import (
    build_adapter,
    build_chat_base,
    build_tokenizer,
    copy_release,
    write_manifest,
    write_sha256sums,
)

needs_ct2 = pytest.mark.skipif(
    importlib.util.find_spec("ctranslate2") is None and os.environ.get("MERGEKIT_LITE_RUNTIME_TESTS") != "1",
    reason="ctranslate2 not installed: `pip install 'mergekit-lite[ctranslate2]'` (make test does)",
)
needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime_genai") is None and os.environ.get("MERGEKIT_LITE_RUNTIME_TESTS") != "1",
    reason="onnxruntime-genai not installed: `pip install 'mergekit-lite[onnxruntime-genai]'` (make test does)",
)
CT2 = {"max_new_tokens": 4, "runtimes": ["ctranslate2"]}
ORT = {"max_new_tokens": 4, "runtimes": ["onnxruntime-genai"]}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ct2")
    base = build_chat_base(root / "base", build_tokenizer())
    adapter = build_adapter(base, root / "adapter", seed=5, r=4, lora_alpha=8, target_modules="all-linear")
    manifest = write_manifest(root, base, [adapter], "float32", verify=CT2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return manifest, run_merge(manifest)


def ct2_rows(report) -> dict[str, tuple[bool, object, str]]:
    return {c.name: (c.passed, c.figure, c.detail) for c in report.checks if c.group == "runtimes"}


@needs_ct2
def test_ctranslate2_runs_the_release_as_transformers_does(release) -> None:
    _, out = release
    verification = json.loads((out / "verification.json").read_text())
    rows = {c["name"]: c for c in verification["checks"] if c["group"] == "runtimes"}
    assert set(rows) == {"ctranslate2: max_abs_logit_diff", "ctranslate2: greedy_match"}
    assert all(r["passed"] for r in rows.values()), rows
    assert rows["ctranslate2: max_abs_logit_diff"]["figure"] < 1e-5  # float32 both: summation order only
    assert rows["ctranslate2: greedy_match"]["figure"] == 1.0
    assert "ctranslate2" in verification["context"]["runtimes"]


@needs_ct2
def test_a_rope_setting_ctranslate2_lacks_fails_the_check(release, tmp_path: Path) -> None:
    """The negative control: the release's RoPE made dynamic-NTK in config.json (transformers runs it;
    CTranslate2's converter does not implement it): the runtimes group fails, saying why."""
    manifest, out = release
    copy = copy_release(out, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["rope_parameters"] = {**config["rope_parameters"], "rope_type": "dynamic", "factor": 4.0}
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    write_sha256sums(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = verify_release(manifest, against=copy)
    failed = [c for c in report.failures if c.group == "runtimes"]
    assert failed and "RoPE scaling type 'dynamic' is not yet implemented" in failed[0].detail, failed


def test_ctranslate2_missing_is_refused_before_anything_is_written(release, tmp_path: Path, monkeypatch) -> None:
    manifest, _ = release
    other = write_manifest(tmp_path, *_inputs(manifest), "float32", verify=CT2, absolute=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ctranslate2" else _real(name))
    result = CliRunner().invoke(main, ["merge", str(other)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: `verify.runtimes: [ctranslate2]`: CTranslate2 is not installed; `pip install 'mergekit-lite[ctranslate2]'`"
    )
    assert not (tmp_path / "out").exists()


_real = importlib.util.find_spec


def _inputs(manifest: Path) -> tuple[Path, list[Path]]:
    import yaml

    doc = yaml.safe_load(manifest.read_text())
    root = manifest.parent

    def path(p) -> Path:
        p = Path(p if isinstance(p, str) else p["path"])
        return p if p.is_absolute() else (root / p).resolve()

    return path(doc["base"]), [path(a) for a in doc["adapters"]]


# --------------------------------------------------------------------------- onnxruntime-genai


def wide_base(out: Path) -> Path:
    """A tiny Llama whose head size is 16 (onnxruntime's GroupQueryAttention needs a multiple of 16)."""
    from transformers import GenerationConfig, LlamaConfig

    from builders import save_base

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    generation = GenerationConfig(bos_token_id=2, eos_token_id=3, pad_token_id=1)
    return save_base(config, out, seed=0, generation_config=generation, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ort_release(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ort")
    base = wide_base(root / "base")
    adapter = build_adapter(base, root / "adapter", seed=6, r=4, lora_alpha=8, target_modules="all-linear")
    manifest = write_manifest(root, base, [adapter], "float32", verify=ORT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return manifest, run_merge(manifest)


@needs_ort
def test_onnxruntime_genai_runs_the_release_as_transformers_does(ort_release) -> None:
    _, out = ort_release
    verification = json.loads((out / "verification.json").read_text())
    rows = {c["name"]: c for c in verification["checks"] if c["group"] == "runtimes"}
    assert set(rows) == {"onnxruntime-genai: max_abs_logit_diff", "onnxruntime-genai: greedy_match"}
    assert all(r["passed"] for r in rows.values()), rows
    assert rows["onnxruntime-genai: max_abs_logit_diff"]["figure"] < 1e-4
    print("\nonnxruntime-genai:", rows["onnxruntime-genai: max_abs_logit_diff"]["figure"])


@needs_ort
def test_a_head_size_onnxruntime_cannot_run_fails_naming_it(tmp_path: Path) -> None:
    base = build_chat_base(tmp_path / "base", build_tokenizer())  # head size 8
    adapter = build_adapter(base, tmp_path / "adapter", seed=6, r=4, lora_alpha=8, target_modules="all-linear")
    manifest = write_manifest(tmp_path, base, [adapter], "float32", verify=ORT)
    with warnings.catch_warnings(), pytest.raises(GateFailed) as rejected:
        warnings.simplefilter("ignore")
        execute(prepare(manifest))
    report = rejected.value.report
    assert {c.group for c in report.failures} == {"runtimes"}, [c.name for c in report.failures]
    failed = [c for c in report.failures if c.group == "runtimes"]
    assert failed and "head_size shall be a multiple of 16" in failed[0].detail, failed


# --------------------------------------------------------------------------- found here: stop ids


@pytest.mark.parametrize("layered", ["0", "1"], ids=["whole", "layer-by-layer"])
def test_greedy_paths_use_the_release_stop_ids(tmp_path: Path, monkeypatch, layered: str) -> None:
    """The base's generation_config stops at id 3 only; the release's also at the tokenizer's EOS
    (<|end|>, id 4), which the plan adds. The greedy paths never choose a stop id (min_new_tokens), so
    with each model's own ids the reference chose <|end|> where the release could not, and this
    correct float32 merge failed greedy_match (0.75). Both now use the release's ids."""
    monkeypatch.setenv("MERGEKIT_LITE_LAYER_BY_LAYER", layered)
    base = wide_base(tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", seed=6, r=4, lora_alpha=8, target_modules="all-linear")
    manifest = write_manifest(tmp_path, base, [adapter], "float32", verify={"max_new_tokens": 4})
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = execute(prepare(manifest)).report
    rows = {c.name: c for c in report.checks if c.group == "end_to_end"}
    assert rows["greedy_match"].passed and rows["greedy_match"].figure == 1.0, rows["greedy_match"]
    assert report.context["runner"].startswith("layer by layer") == (layered == "1"), report.context["runner"]
