"""Issue 17, part 1: end-to-end thresholds calibrated in the same run against the ideal merge.

A strongly trained adapter (large factors, all-linear) on SmolLM2-135M-Instruct makes the model
sensitive to the rounding of its merged weights to 16 bits: PEFT's own float32 merge rounded once
to bfloat16 or float16 (the ideal merge) is already farther from the unmerged reference than the
fixed table allows, so the table alone refused every correct merge of it. With the thresholds
calibrated against that ideal in the same run the release passes, and so does PEFT's own
merge_and_unload output under `verify --against`; the table's thresholds are the floors, and a
wrong merge (an adapter weight of 1.25 instead of 1) still fails the end-to-end check.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_lite.gate.calibrate import calibrated
from mergekit_lite.gate.endtoend import EndToEnd, Placement, check_end_to_end
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.tolerances import TOLERANCES, within
from mergekit_lite.pipeline import execute, prepare, verify_release
from mergekit_lite.sources.tokenizer import load_tokenizer, tokenizer_files
from mergekit_lite.tools.example import prepare as prepare_example

from helpers import write_manifest

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "examples"  # shared with `make demo` and test_smollm2.py
PROMPTS = ["Hello! How are you today?", "What is the capital of France?"]
VERIFY = {"prompts": PROMPTS, "max_new_tokens": 4}
SCALE = {"bfloat16": 1.5, "float16": 4.0}  # the factors' multiplier: strong enough that the table refuses
REPORT_DTYPE = {"bfloat16": "BF16", "float16": "F16"}
E2E = ("max_abs_logit_diff", "mean_kl", "top1_agreement", "greedy_match")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return prepare_example(CACHE)[0]
    except Exception as exc:  # the example package missing is a set-up error, not a skip
        pytest.fail(f"cannot prepare the SmolLM2 example: {exc}")


def strong_adapter(base: Path, out: Path, scale: float) -> Path:
    """An all-linear r=16 LoRA with random A and B (init_lora_weights=False), every factor x scale."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(scale)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def strong(smollm2, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """dtype -> (adapter, manifest) for the strong adapter of that dtype."""
    root = tmp_path_factory.mktemp("strong")
    built = {}
    for dtype, scale in SCALE.items():
        adapter = strong_adapter(smollm2, root / f"adapter-{dtype}", scale)
        manifest = write_manifest(root / dtype, smollm2, [adapter], dtype, absolute=True, verify=VERIFY)
        built[dtype] = (adapter, manifest)
    return built


@pytest.mark.parametrize("dtype", list(SCALE))
def test_strong_adapter_passes_the_calibrated_gate(strong, dtype: str) -> None:
    _, manifest = strong[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = execute(prepare(manifest))
    report = result.report
    assert report is not None and report.passed, [(c.name, c.figure, c.threshold, c.detail) for c in report.failures]
    table = TOLERANCES[REPORT_DTYPE[dtype]]
    rows = {c.name: c for c in report.checks if c.group == "end_to_end"}
    # the negative control: the fixed table alone rejects this release (as it did before calibration)
    refused = [m for m in E2E if not within(m, rows[m].figure, table[m])]
    assert "mean_kl" in refused, {m: rows[m].figure for m in E2E}
    ideal = report.context["calibration"]["ideal_vs_reference"]
    for metric in refused:  # each loosened threshold is margin x the ideal merge's own distance
        assert not within(metric, ideal[metric], table[metric]), (metric, ideal[metric])
        assert "the ideal merge's distance" in rows[metric].detail
    print(f"\n[{dtype}]", {m: (rows[m].figure, rows[m].threshold, ideal[m]) for m in E2E})


def _peft_merge(base: Path, adapter: Path, out: Path, dtype: torch.dtype) -> Path:
    """PEFT's merge_and_unload in the output dtype, saved with save_pretrained; the tokenizer files copied."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    for path in tokenizer_files(base):
        shutil.copy2(path, out / path.name)
    return out


def _end_to_end(smollm2: Path, adapter: Path, candidate: Path) -> GateReport:
    """The calibrated end-to-end check alone: `candidate` against PEFT's base + adapter at weight 1."""
    report = GateReport(dtype="BF16")
    check = EndToEnd(
        candidate=candidate,
        base=smollm2,
        adapters=[(adapter, 1.0)],
        placement=Placement(),
        tokenizer=load_tokenizer(smollm2),
        prompts=PROMPTS,
        new_tokens=4,
        limits=dict(TOLERANCES["BF16"]),
        output_dtype="BF16",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_end_to_end(report, check)
    return report


@pytest.fixture(scope="module")
def peft_release(smollm2, strong, tmp_path_factory) -> Path:
    adapter, _ = strong["bfloat16"]
    return _peft_merge(smollm2, adapter, tmp_path_factory.mktemp("peft") / "peft", torch.bfloat16)


def test_peft_merge_and_unload_passes_the_calibrated_end_to_end_check(smollm2, strong, peft_release) -> None:
    """PEFT's bf16 merge (two roundings: the delta, then the sum) is within the calibrated margins."""
    report = _end_to_end(smollm2, strong["bfloat16"][0], peft_release)
    assert report.passed, [(c.name, c.figure, c.threshold, c.detail) for c in report.checks]
    assert not all(within(c.name, c.figure, TOLERANCES["BF16"][c.name]) for c in report.checks)  # the table refuses


def test_peft_merge_and_unload_passes_verify_against(smollm2, strong, peft_release, tmp_path: Path) -> None:
    """Every check passes: the elementwise bound allows PEFT's two roundings (gate/elementwise.py), and
    the integrity group is skipped, as for any folder mergekit-lite did not publish (no SHA256SUMS, no
    release.json). `output.compat: false`: PEFT writes v5 configs only."""
    adapter, _ = strong["bfloat16"]
    manifest = write_manifest(tmp_path, smollm2, [adapter], "bfloat16", absolute=True, verify=VERIFY)
    doc = yaml.safe_load(manifest.read_text())
    doc["output"]["compat"] = False
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = verify_release(manifest, against=peft_release)
    assert report.passed, [(c.group, c.name, c.detail) for c in report.failures]
    assert "is not a mergekit-lite release" in report.skipped["integrity"]


def test_a_wrong_merge_still_fails_the_calibrated_check(smollm2, strong, tmp_path: Path) -> None:
    """The release merged with the adapter at weight 1.25, checked end to end against weight 1."""
    adapter, _ = strong["bfloat16"]
    manifest = write_manifest(tmp_path, smollm2, [(adapter, 1.25)], "bfloat16", absolute=True, verify=VERIFY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrong = execute(prepare(manifest), verify=False).output
    report = _end_to_end(smollm2, adapter, wrong)
    failed = {c.name for c in report.failures}
    assert {"max_abs_logit_diff", "mean_kl"} <= failed, [(c.name, c.figure, c.threshold) for c in report.checks]


TABLE = {"max_abs_logit_diff": 2.0, "mean_kl": 5e-3, "top1_agreement": 0.95, "greedy_match": 0.75}


@pytest.mark.parametrize(
    ("ideal", "fixed", "expected"),
    [
        # a quiet ideal: the table's floors stand
        ({"max_abs_logit_diff": 0.1, "mean_kl": 1e-5, "top1_agreement": 1.0, "greedy_match": 1.0}, (), TABLE),
        # a loud ideal: margin x its distance (x2 logits, x4 KL, x2 the disagreement)
        (
            {"max_abs_logit_diff": 6.0, "mean_kl": 0.04, "top1_agreement": 0.9, "greedy_match": 0.5},
            (),
            {"max_abs_logit_diff": 12.0, "mean_kl": 0.16, "top1_agreement": 0.8, "greedy_match": 0.0},
        ),
        # thresholds the manifest sets are used as given
        (
            {"max_abs_logit_diff": 6.0, "mean_kl": 0.04, "top1_agreement": 0.9, "greedy_match": 0.5},
            ("max_abs_logit_diff", "top1_agreement"),
            {"max_abs_logit_diff": 2.0, "mean_kl": 0.16, "top1_agreement": 0.95, "greedy_match": 0.0},
        ),
        # no ideal merge (an offloaded reference): the table alone
        ({}, (), TABLE),
    ],
)
def test_calibrated_thresholds(ideal, fixed, expected) -> None:
    limits, rules = calibrated(dict(TABLE), ideal, frozenset(fixed))
    assert limits == pytest.approx(expected)
    for metric in fixed:
        assert rules[metric] == "set in the manifest"
