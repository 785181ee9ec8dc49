"""Issue 17 part 3, the user's own data (`verify.eval`): per-token loss and perplexity of the base,
of PEFT's base + adapters (unmerged) and of the release, held to the reference within a margin
calibrated against the ideal merge; bad eval files refused at plan time.

One tiny chat Llama (release_builders) with two adapters: `linear`, a LoRA on all linear layers,
and `cat_row`, a LoRA on the embedding that changes one row only, that of the token "cat", which
the eval file holds and the gate's standard prompts do not.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_lite import run_merge
from mergekit_lite.cli import main
from mergekit_lite.gate.endtoend import EndToEnd, Placement, check_end_to_end, prompt_ids
from mergekit_lite.gate.eval import check_eval
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.tolerances import thresholds
from mergekit_lite.manifest.load import load_manifest
from mergekit_lite.pipeline import prepare, verify_release
from mergekit_lite.sources.evaldata import read_eval
from mergekit_lite.sources.tokenizer import load_tokenizer

from release_builders import (
    build_adapter,
    build_chat_base,
    build_tokenizer,
    copy_release,
    rewrite_release,
    write_manifest,
)

FAST = {"max_new_tokens": 4}
EMBED = "model.embed_tokens.weight"
EMBED_A = "base_model.model.model.embed_tokens.lora_embedding_A"
RECORDS = [
    {"text": "The cat sat on the mat."},
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital of France."},
        ]
    },
    {"text": "The sea is blue and wide.", "messages": None},  # a null column, as datasets.to_json writes it
    {
        "messages": [
            {"role": "user", "content": "Write a short poem about the sea."},
            {"role": "assistant", "content": "The cat sat on the sea."},
        ],
        "id": 7,
    },
    {"text": "A neural network is a function with many parameters."},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class Setup:
    root: Path
    base: Path
    linear: Path
    cat_row: Path
    eval_file: Path
    manifest: Path  # both adapters, float32, verify.eval
    release: Path


def _cat_row_adapter(base: Path, out: Path, cat: int) -> Path:
    """An embedding LoRA whose delta is zero except on the row of token `cat`."""
    build_adapter(base, out, seed=3, r=2, lora_alpha=4, target_modules=["embed_tokens"])
    tensors = load_file(out / "adapter_model.safetensors")
    a = tensors[EMBED_A]  # [r, vocab]: column j makes row j of the delta
    keep = torch.zeros_like(a)
    keep[:, cat] = 4 * a[:, cat]  # a change large enough to move the losses after "cat"
    tensors[EMBED_A] = keep.contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("eval")
    tokenizer = build_tokenizer()
    base = build_chat_base(root / "base", tokenizer)
    linear = build_adapter(base, root / "linear", seed=1, r=4, lora_alpha=8, target_modules="all-linear")
    cat_row = _cat_row_adapter(base, root / "cat_row", tokenizer.convert_tokens_to_ids("cat"))
    eval_file = write_jsonl(root / "eval.jsonl", RECORDS)
    manifest = write_manifest(
        root / "both", base, [linear, cat_row], "float32", verify={**FAST, "eval": str(eval_file)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        release = run_merge(manifest)
    return Setup(root, base, linear, cat_row, eval_file, manifest, release)


def _rows(report) -> dict[str, object]:
    return {c.id: c for c in report.checks if c.group == "eval"}


# --------------------------------------------------------------------------- a clean release


def test_clean_release_passes_and_reports_perplexities(setup: Setup) -> None:
    doc = json.loads((setup.release / "verification.json").read_text())
    assert doc["passed"] is True
    rows = {c["id"]: c for c in doc["checks"] if c["group"] == "eval"}
    assert set(rows) == {"eval.token_loss_diff", "eval.perplexity_diff"}
    assert all(r["passed"] for r in rows.values())
    found = doc["context"]["eval"]
    assert found["file"] == "eval.jsonl" and found["records"] == len(RECORDS) and found["chat_records"] == 2
    ppl = found["perplexity"]
    assert ppl["base"] != pytest.approx(ppl["base_plus_adapters"], rel=1e-3)  # the adapters' effect is shown
    assert ppl["release"] == pytest.approx(ppl["base_plus_adapters"], rel=1e-4)  # float32: the same model
    assert rows["eval.token_loss_diff"]["figure"] < 1e-4
    # the model card shows the three perplexities
    card = (setup.release / "README.md").read_text()
    assert "## Evaluation on your data" in card
    for label, key in (
        ("base", "base"),
        ("base + adapters (PEFT, unmerged)", "base_plus_adapters"),
        ("this release", "release"),
    ):
        assert f"| {label} | {found['mean_token_loss'][key]:.4f} | {ppl[key]:.4f} |" in card
    # the eval file is an input of the release
    receipt = json.loads((setup.release / "release.json").read_text())
    assert any(r["path"].endswith("eval.jsonl") for r in receipt["inputs"])


# --------------------------------------------------------------------------- defects


def test_dropped_adapter_is_caught_by_the_eval_check(setup: Setup, tmp_path: Path) -> None:
    """A release merged from `cat_row` alone, verified as the two-adapter release: the eval rows fail."""
    one = write_manifest(tmp_path, setup.base, [setup.cat_row], "float32", verify={**FAST, "logits": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dropped = run_merge(one)
    report = verify_release(setup.manifest, against=dropped)
    rows = _rows(report)
    assert not rows["eval.token_loss_diff"].passed, rows["eval.token_loss_diff"].detail
    assert rows["eval.token_loss_diff"].figure > 10 * rows["eval.token_loss_diff"].threshold
    assert not rows["eval.perplexity_diff"].passed


def _revert_cat_row(setup: Setup, folder: Path) -> None:
    """The release's embedding row of "cat" put back to the base's: the `cat_row` adapter dropped
    on the one row only the eval data reads."""
    cat = load_tokenizer(setup.base).convert_tokens_to_ids("cat")
    base_row = load_file(setup.base / "model.safetensors")[EMBED][cat]

    def mutate(tensors, where):
        tensors[EMBED] = tensors[EMBED].clone()
        tensors[EMBED][cat] = base_row

    rewrite_release(folder, mutate)


def _models(setup: Setup, candidate: Path) -> EndToEnd:
    return EndToEnd(
        candidate=candidate,
        base=setup.base,
        adapters=[(setup.linear, 1.0), (setup.cat_row, 1.0)],
        placement=Placement(),
        tokenizer=load_tokenizer(candidate),
        prompts=None,
        new_tokens=FAST["max_new_tokens"],
        limits=thresholds("F32"),
        output_dtype="F32",
    )


def test_defect_only_the_eval_data_exercises(setup: Setup, tmp_path: Path) -> None:
    """The end-to-end check alone passes the defect (its standard prompts never read the row); the
    gate's eval check fails it. The negative control is the clean release, which passed both
    (test_clean_release_passes_and_reports_perplexities: the same checks, the same thresholds)."""
    clean = json.loads((setup.release / "verification.json").read_text())
    assert {c["group"] for c in clean["checks"] if c["passed"]} >= {"end_to_end", "eval"} and clean["passed"]
    tokenizer = load_tokenizer(setup.base)
    cat = tokenizer.convert_tokens_to_ids("cat")
    ids, _ = prompt_ids(tokenizer, None, len(tokenizer))
    assert all(cat not in seq.tolist() for seq in ids), "the standard prompts must not hold the token"
    candidate = copy_release(setup.release, tmp_path / "candidate")
    _revert_cat_row(setup, candidate)
    end_to_end = GateReport(dtype="F32")
    check_end_to_end(end_to_end, _models(setup, candidate))
    assert end_to_end.passed, [(c.name, c.figure, c.threshold) for c in end_to_end.failures]
    assert {c.name for c in end_to_end.checks} == {"max_abs_logit_diff", "mean_kl", "top1_agreement", "greedy_match"}
    report = verify_release(setup.manifest, against=candidate)
    rows = _rows(report)
    assert not rows["eval.token_loss_diff"].passed
    assert rows["eval.token_loss_diff"].figure > 10 * rows["eval.token_loss_diff"].threshold
    assert {c.group for c in report.failures} <= {"algebra", "eval"}  # the algebra check sees the row too


# --------------------------------------------------------------------------- progress


def cli(*args: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(main, list(args))


def test_progress_in_a_log_and_none_when_quiet(setup: Setup, tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path,
        setup.base,
        [setup.linear],
        "float32",
        overwrite=True,
        verify={**FAST, "logits": False, "eval": str(setup.eval_file)},
    )
    result = cli("merge", str(manifest))
    assert result.exit_code == 0, result.output
    assert "eval: scoring tokens: 100% (" in result.stderr
    assert "eval: perplexity, release vs base + adapters" in result.stdout
    quiet = cli("merge", str(manifest), "-q")
    assert quiet.exit_code == 0, quiet.output
    assert "eval: scoring" not in quiet.stderr


# --------------------------------------------------------------------------- bad eval input


def _no_template_tokenizer(root: Path) -> Path:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    folder = root / "plain-tokenizer"
    tokenizer.save_pretrained(folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


CHAT = {"messages": [{"role": "user", "content": "Hello!"}]}
BAD = {
    "missing_file": (None, "manifest.yaml:", "does not exist"),
    "malformed_line": (
        ['{"text": "The cat sat."}', '{"text": "The sea', '{"text": "x"}'],
        "eval.jsonl:2:",
        "not valid JSON",
    ),
    "neither_text_nor_messages": (
        [json.dumps({"text": "The cat."}), "", json.dumps({"prompt": "Hi", "completion": "Hello"})],
        "eval.jsonl:3:",
        "neither `text` nor `messages` (its keys: `prompt`, `completion`)",
    ),
    "empty_file": ([], "eval.jsonl:1:", "no records"),
    "both_text_and_messages": (
        [json.dumps({"text": "The cat.", **CHAT})],
        "eval.jsonl:1:",
        "both `text` and `messages`",
    ),
    "chat_without_template": ([json.dumps({"text": "The cat."}), json.dumps(CHAT)], "eval.jsonl:2:", "has none"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_eval_input_is_refused_at_plan_time(setup: Setup, case: str, tmp_path: Path) -> None:
    lines, where, words = BAD[case]
    eval_file = tmp_path / "eval.jsonl"
    if lines is not None:
        eval_file.write_text("".join(line + "\n" for line in lines))
    sections = {"verify": {"eval": {"path": str(eval_file), "max_samples": 8}}}
    if case == "chat_without_template":
        sections["tokenizer"] = str(_no_template_tokenizer(tmp_path))
    manifest = write_manifest(tmp_path, setup.base, [setup.linear], "float32", **sections)
    result = cli("merge", str(manifest))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.output
    assert where in errors[0] and words in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {
            "manifest.yaml",
            *(["eval.jsonl"] if lines is not None else []),
            *(["plain-tokenizer"] if case == "chat_without_template" else []),
        }
    )


def test_bad_input_control_the_same_files_fixed_merge(setup: Setup, tmp_path: Path) -> None:
    """Negative control for the refusals: the chat record with a template, a good line in place of
    the malformed one, plans without error."""
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"text": "The cat sat."}, CHAT, {"text": "x"}])
    manifest = write_manifest(tmp_path, setup.base, [setup.linear], "float32", verify={"eval": str(eval_file)})
    data = prepare(manifest, for_output=False).eval_data
    assert data.records == 3 and data.chat == 1
    # every token of the formatted conversation is scored, as TRL's SFT loss does by default
    tokenizer = load_tokenizer(setup.base)
    formatted = tokenizer.apply_chat_template(CHAT["messages"], return_dict=False)
    assert data.sequences[1] == tuple(formatted)
    assert data.lines == (1, 2) and data.too_short == 1  # "x" is one token: nothing to predict, left out


def test_eval_spec_short_form_and_limits(setup: Setup, tmp_path: Path) -> None:
    """`verify.eval: PATH` is `{path: PATH}`, relative to the manifest; max_samples and max_length cut."""
    shutil.copy(setup.eval_file, tmp_path / "data.jsonl")
    manifest = write_manifest(tmp_path, setup.base, [setup.linear], "float32", verify={"eval": "data.jsonl"})
    spec = load_manifest(manifest).manifest.verify.eval
    assert spec.path == str((tmp_path / "data.jsonl").resolve()) and (spec.max_samples, spec.max_length) == (64, 512)
    cut = write_manifest(
        tmp_path,
        setup.base,
        [setup.linear],
        "float32",
        name="cut.yaml",
        verify={"eval": {"path": "data.jsonl", "max_samples": 2, "max_length": 4}},
    )
    data = prepare(cut, for_output=False).eval_data
    assert data.records == 2 and all(len(s) <= 4 for s in data.sequences) and data.truncated == 2


@pytest.mark.parametrize("candidate", ["clean", "dropped_adapter"])
def test_eval_layer_by_layer_scores_as_the_whole_models(setup: Setup, candidate: str, tmp_path: Path) -> None:
    """The eval check with its models run layer by layer (gate/streamed.py) gives the whole models'
    figures and verdicts: the clean release passes, a release missing an adapter fails (the control)."""
    folder = setup.release
    if candidate == "dropped_adapter":
        one = write_manifest(tmp_path, setup.base, [setup.cat_row], "float32", verify={**FAST, "logits": False})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folder = run_merge(one)
    spec = load_manifest(setup.manifest).manifest.verify.eval
    data = read_eval(spec, load_tokenizer(setup.release), "verify.eval")
    reports = {}
    for layered in (False, True):
        reports[layered] = GateReport(dtype="F32")
        check_eval(reports[layered], dataclasses.replace(_models(setup, folder), layer_by_layer=layered), data)
    assert reports[True].context["eval"]["runner"] == "layer by layer (asked for)"
    assert reports[False].context["eval"]["runner"].startswith("whole models")
    whole, layered = _rows(reports[False]), _rows(reports[True])
    for row in whole:
        assert layered[row].passed == whole[row].passed == (candidate == "clean"), row
        assert layered[row].figure == pytest.approx(whole[row].figure, rel=1e-6, abs=1e-9), row
    for name, value in reports[False].context["eval"]["perplexity"].items():
        assert reports[True].context["eval"]["perplexity"][name] == pytest.approx(value, rel=1e-9), name


# --------------------------------------------------------------------------- the thresholds


@pytest.mark.parametrize(
    ("effect", "ideal", "fixed", "expected", "rule"),
    [
        (1.0, 0.001, (), 0.02, "the table's floor"),  # bf16 floor 0.02: far below half the effect
        (0.01, 0.001, (), 0.005, "the table's floor"),  # a weak adapter: the floor capped at half its effect
        (1.0, 0.05, (), 0.1, "2 x the ideal merge's distance"),  # a sensitive model: 2 x the ideal
        (0.01, None, (), 0.005, "the table (no ideal merge)"),  # no ideal (an offloaded reference)
        (1.0, 0.05, ("eval_token_loss_diff",), 0.3, "set in the manifest"),  # `verify.thresholds` as given
    ],
    ids=["floor", "effect_cap", "calibrated", "no_ideal", "manifest"],
)
def test_token_loss_threshold_rules(effect, ideal, fixed, expected, rule) -> None:
    from mergekit_lite.gate.eval import _thresholds

    limits = thresholds("BF16", {"eval_token_loss_diff": 0.3} if fixed else None)
    check = EndToEnd(
        candidate=Path("."),
        base=Path("."),
        adapters=[],
        placement=Placement(),
        tokenizer=None,
        prompts=None,
        new_tokens=0,
        limits=limits,
        fixed=frozenset(fixed),
    )
    metrics = ("eval_token_loss_diff", "eval_perplexity_diff")
    got, rules, _ = _thresholds(
        check, dict.fromkeys(metrics, effect), {} if ideal is None else dict.fromkeys(metrics, ideal)
    )
    assert got["eval_token_loss_diff"] == pytest.approx(expected)
    assert rules["eval_token_loss_diff"] == rule
