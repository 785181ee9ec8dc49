"""Issue 17, part 4: the end-to-end check run layer by layer (gate/streamed.py) equals the whole models.

The layered runner builds each model on the meta device and reads one decoder layer at a time from
the safetensors files; these tests hold its logits, greedy tokens and ideal merge to those of the
whole models loaded by transformers and PEFT, on tiny models of each supported architecture, with
a negative control (a release with one stored tensor changed is seen as changed), and run the whole
calibrated check both ways.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_lite import run_merge
from mergekit_lite.gate import streamed
from mergekit_lite.gate.calibrate import ideal_merge
from mergekit_lite.gate.endtoend import (
    LAYERED_ENV,
    EndToEnd,
    Placement,
    _forward,
    _generate,
    check_end_to_end,
    choose_runner,
    reference_model,
)
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.tolerances import TOLERANCES

from architectures import ARCHES, CASES_BY_ID, build_adapter, build_base
from helpers import write_manifest

# every model type of streamed.STREAMED_TYPES, plus LoRA on an embedding (tied and not) and modules_to_save
CASES = [
    "llama",
    "llama_tied-embed",
    "llama-embed-head",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "phi3",
    "gpt2",
    "gpt2-embed",
]
IDS = [torch.tensor([3, 5, 7, 11, 13, 17, 19]), torch.tensor([4, 90, 8]), torch.tensor([42])]
ATOL_REL = 1e-6  # x max(1, max|logit|), float32: observed 0, and 1.5e-7 on a release with a tied head
E2E = ("max_abs_logit_diff", "mean_kl", "top1_agreement", "greedy_match")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    built: dict[str, tuple[Path, Path]] = {}

    def get(case_id: str) -> tuple[Path, Path]:
        if case_id not in built:
            case = CASES_BY_ID[case_id]
            base = root / f"base-{case.arch}"
            if not base.exists():
                build_base(case.arch, base)
            built[case_id] = (base, build_adapter(case, base, root / f"adapter-{case_id}"))
        return built[case_id]

    return get


def _whole(base: Path, adapter: Path, model_class: str, weight: float = 1.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference_model(base, [(adapter, weight)], torch.float32, {"device_map": "cpu"}, model_class=model_class)


def _peft_release(base: Path, adapter: Path, model_class: str, out: Path, dtype: torch.dtype, weight: float = 1.0):
    """PEFT's merge_and_unload (at `weight`) saved in `dtype` by save_pretrained: a release mergekit did not make."""
    if not out.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _whole(base, adapter, model_class, weight).merge_and_unload().to(dtype).save_pretrained(out)
    return out


def _load_release(folder: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest |difference| in units of the float32 tolerance (<= 1: equal)."""
    scale = ATOL_REL * max(1.0, max(float(w.abs().max()) for w in want))
    return max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale


@pytest.mark.parametrize("case_id", CASES)
def test_layered_logits_equal_the_whole_models(case_id: str, zoo, tmp_path: Path) -> None:
    base, adapter = zoo(case_id)
    model_class = ARCHES[CASES_BY_ID[case_id].arch].model_class
    release = _peft_release(base, adapter, model_class, tmp_path / "release", torch.float32)
    whole = _whole(base, adapter, model_class)
    want_reference = [_forward(whole, seq) for seq in IDS]
    with whole.disable_adapter():
        want_base = [_forward(whole, seq) for seq in IDS]
    merged = _load_release(release)
    want_release = [_forward(merged, seq) for seq in IDS]
    with streamed.opened(base, [(adapter, 1.0)], release, model_class) as models:
        got = streamed.logits(models, IDS, base=True)
    assert _close(got["reference"], want_reference) <= 1
    assert _close(got["base"], want_base) <= 1
    assert _close(got["release"], want_release) <= 1
    # negative controls: the adapter's effect is seen, and so is one stored tensor of the last layer changed
    assert _close(got["reference"], want_base) > 100
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in release.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    weights = load_file(changed / "model.safetensors")
    last = max(int(k.split(".")[2]) for k in weights if ".layers." in k or ".h." in k)
    name = next(k for k in sorted(weights) if f".{last}." in k and k.endswith("weight") and weights[k].ndim == 2)
    weights[name] = weights[name] + 0.05
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    with streamed.opened(base, [(adapter, 1.0)], changed, model_class) as models:
        seen = streamed.logits(models, IDS)
    assert _close(seen["release"], want_release) > 100, name
    assert _close(seen["reference"], want_reference) <= 1


@pytest.mark.parametrize("case_id", ["llama", "gpt2-embed"])
def test_layered_greedy_and_ideal_merge_equal_the_whole_models(case_id: str, zoo, tmp_path: Path) -> None:
    """Greedy tokens (KV cache per layer) equal transformers' generate; the layer-by-layer ideal merge
    equals gate/calibrate.py's whole-model one, logits and tokens."""
    base, adapter = zoo(case_id)
    model_class = ARCHES[CASES_BY_ID[case_id].arch].model_class
    release = _peft_release(base, adapter, model_class, tmp_path / "release", torch.bfloat16)
    n = 5
    whole = _whole(base, adapter, model_class)
    want = {"reference": [_generate(whole, seq, n) for seq in IDS]}
    paths = [_forward(whole, seq, t)[len(seq) - 1 : len(seq) - 1 + n] for seq, t in zip(IDS, want["reference"])]
    merged = _load_release(release)
    want["release"] = [_generate(merged, seq, n) for seq in IDS]
    ideal_model, _ = ideal_merge(whole, "BF16")  # consumes `whole`
    want["ideal"] = [_generate(ideal_model, seq, n) for seq in IDS]
    want_ideal_logits = [_forward(ideal_model, seq) for seq in IDS]
    with streamed.opened(base, [(adapter, 1.0)], release, model_class, ideal=torch.bfloat16) as models:
        run = streamed.greedy(models, IDS, n)
    assert run.tokens == want
    assert _close(run.logits["ideal"], want_ideal_logits) <= 1
    # negative control: the ideal merge (rounded to bf16) is not the unmerged reference
    assert _close(run.logits["ideal"], run.logits["reference"]) > 100
    for rows, path in zip(run.chosen_from["reference"], paths):  # the logits each token was chosen from
        assert rows.shape == path.shape and float((rows - path).abs().max()) <= 1


def _check(base: Path, adapter: Path, release: Path, model_class: str, layered: bool) -> GateReport:
    report = GateReport(dtype="BF16")
    check = EndToEnd(
        candidate=release,
        base=base,
        adapters=[(adapter, 1.0)],
        placement=Placement(),
        tokenizer=None,
        prompts=None,
        new_tokens=4,
        limits=dict(TOLERANCES["BF16"]),
        output_dtype="BF16",
        model_class=model_class,
        layer_by_layer=layered,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_end_to_end(report, check)
    return report


@pytest.mark.parametrize("weight", [1.0, 1.5])
def test_calibrated_check_layer_by_layer_equals_the_whole_models(weight: float, zoo, tmp_path: Path) -> None:
    """The whole end-to-end check, calibration included, gives the same figures, thresholds and
    verdicts both ways: a correct bf16 release passes, one merged at weight 1.5 fails (the control)."""
    base, adapter = zoo("llama")
    release = _peft_release(base, adapter, "LlamaForCausalLM", tmp_path / "release", torch.bfloat16, weight)
    whole = _check(base, adapter, release, "LlamaForCausalLM", layered=False)
    layered = _check(base, adapter, release, "LlamaForCausalLM", layered=True)
    assert whole.context["runner"].startswith("whole models")
    assert layered.context["runner"] == "layer by layer (asked for)"
    assert "each layer" in layered.context["calibration"]["ideal"]
    rows = {
        mode: {c.name: c for c in r.checks if c.group == "end_to_end"} for mode, r in (("w", whole), ("l", layered))
    }
    for metric in E2E:
        w, lay = rows["w"][metric], rows["l"][metric]
        assert lay.passed == w.passed, metric
        assert lay.figure == pytest.approx(w.figure, rel=1e-6, abs=1e-9), metric
        assert lay.threshold == pytest.approx(w.threshold, rel=1e-6), metric
    for key in ("ideal_vs_reference", "release_vs_ideal"):
        for metric, value in whole.context["calibration"][key].items():
            assert layered.context["calibration"][key][metric] == pytest.approx(value, rel=1e-6, abs=1e-9)
    assert layered.passed == whole.passed == (weight == 1.0), [
        (c.name, c.figure, c.threshold) for c in layered.failures
    ]


def test_the_runner_is_chosen_by_memory_and_can_be_forced(zoo, monkeypatch, tmp_path: Path) -> None:
    base, adapter = zoo("llama")
    check = EndToEnd(
        candidate=base,
        base=base,
        adapters=[(adapter, 1.0)],
        placement=Placement(),
        tokenizer=None,
        prompts=None,
        new_tokens=0,
        limits={},
        model_class="LlamaForCausalLM",
        parameters=1000,
    )
    monkeypatch.delenv(LAYERED_ENV, raising=False)
    assert choose_runner(check)[0] is False  # a tiny model: whole
    huge = _replace(check, parameters=10**13)  # 80 TB in float32: never fits
    layered, why = choose_runner(huge)
    assert layered is True and why.startswith("layer by layer (74505.81 GiB in float32"), why
    assert choose_runner(_replace(huge, layer_by_layer=False))[0] is False
    assert choose_runner(_replace(check, layer_by_layer=True)) == (True, "layer by layer (asked for)")
    monkeypatch.setenv(LAYERED_ENV, "1")
    assert choose_runner(check)[0] is True
    monkeypatch.setenv(LAYERED_ENV, "0")
    assert choose_runner(huge)[0] is False
    # an architecture the runner does not cover runs whole, saying why
    config = json.loads((base / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    layered, why = choose_runner(_replace(check, base=other, layer_by_layer=True))
    assert layered is False and "model type `t5` is not one the layer-by-layer runner is tested on" in why
    layered, why = choose_runner(_replace(check, embedding_rows=104, layer_by_layer=True))
    assert layered is False and why.endswith("the adapters resize the vocabulary (96 -> 104 rows)")
    assert choose_runner(_replace(check, embedding_rows=96, layer_by_layer=True))[0] is True  # rows as the base's


def test_a_merge_with_verify_layer_by_layer_runs_the_gate_layered(zoo, tmp_path: Path) -> None:
    """Through the pipeline (the plan's embedding rows and parameter count): `verify.layer_by_layer`
    runs the end-to-end check layered, calibrated against the layer-by-layer ideal merge, and it passes."""
    base, adapter = zoo("qwen2")
    verify = {"layer_by_layer": True, "max_new_tokens": 3}
    manifest = write_manifest(tmp_path, base, [adapter], "bfloat16", absolute=True, verify=verify)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        release = run_merge(manifest)
    doc = json.loads((release / "verification.json").read_text())
    assert doc["context"]["runner"] == "layer by layer (asked for)"
    assert "each layer" in doc["context"]["calibration"]["ideal"]
    rows = {c["name"]: c for c in doc["checks"] if c["group"] == "end_to_end"}
    assert set(rows) == set(E2E) and all(r["passed"] for r in rows.values()) and doc["passed"]


def _replace(check: EndToEnd, **changes) -> EndToEnd:
    return dataclasses.replace(check, **changes)
