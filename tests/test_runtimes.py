"""Issue 19, part 3: `verify.runtimes: [transformers4]`. The release loads in transformers 4.57 (a
venv of its own, `make runtimes`, cached under .cache/runtimes) with the logits and greedy tokens of
transformers 5, both float32; a RoPE value changed in transformers 4's layout only, or a release
shipped without the portable configs, fails it; a runtime not installed is refused in one line.

The tier needing the venv is skipped when it is absent, unless MERGEKIT_LITE_RUNTIME_TESTS=1
(.ci/run builds it and sets that, so CI never skips it).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_lite import run_merge
from mergekit_lite.cli import main
from mergekit_lite.gate.runtimes import ENV
from mergekit_lite.pipeline import verify_release

from architectures import ARCHES, CASES, build_base
from architectures import build_adapter as build_case_adapter
from release_builders import (
    build_adapter,
    build_chat_base,
    build_tokenizer,
    copy_release,
    write_manifest,
    write_sha256sums,
)

REPO = Path(__file__).resolve().parent.parent
T4 = REPO / ".cache" / "runtimes" / "transformers4" / "bin" / "python"
needs_t4 = pytest.mark.skipif(
    not T4.is_file() and os.environ.get("MERGEKIT_LITE_RUNTIME_TESTS") != "1",
    reason="no transformers 4 venv: `make runtimes` builds it (CI does)",
)
RUNTIMES = {"max_new_tokens": 4, "runtimes": ["transformers4"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runtime-inputs")
    base = build_chat_base(root / "base", build_tokenizer())
    adapter = build_adapter(base, root / "adapter", seed=4, r=4, lora_alpha=8, target_modules="all-linear")
    return base, adapter


@pytest.fixture(scope="module")
def t4_env():
    previous = os.environ.get(ENV)
    os.environ[ENV] = str(T4)
    yield
    if previous is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = previous


def merge(manifest: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_merge(manifest)


@pytest.fixture(scope="module")
def release(inputs, t4_env, tmp_path_factory) -> tuple[Path, Path]:
    base, adapter = inputs
    folder = tmp_path_factory.mktemp("runtime-release")
    manifest = write_manifest(folder, base, [adapter], "float32", verify=RUNTIMES)
    return manifest, merge(manifest)


def rows(report_or_doc) -> dict[str, dict]:
    checks = report_or_doc["checks"] if isinstance(report_or_doc, dict) else [c.__dict__ for c in report_or_doc.checks]
    return {f"{c['group']}: {c['name']}": c for c in checks}


@needs_t4
def test_release_loads_in_transformers4_as_in_5(release) -> None:
    _, out = release
    doc = json.loads((out / "verification.json").read_text())
    assert doc["passed"] is True
    checks = rows(doc)
    logits = checks["runtimes: transformers4: max_abs_logit_diff"]
    assert logits["passed"] and logits["figure"] <= 1e-4, logits
    assert checks["runtimes: transformers4: greedy_match"]["figure"] == 1.0
    assert checks["runtimes: transformers4: prompts encode as with transformers 5"]["figure"] == 0
    assert doc["context"]["runtimes"]["transformers4"]["transformers"].startswith("4.57")


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=2))
    write_sha256sums(folder)


@needs_t4
def test_rope_changed_in_the_v4_layout_only_fails_the_runtime_check(release, tmp_path: Path) -> None:
    """transformers 5 reads rope_parameters and cannot see it; transformers 4 reads rope_theta."""
    manifest, out = release
    candidate = copy_release(out, tmp_path / "candidate")
    _edit_config(candidate, lambda doc: doc.__setitem__("rope_theta", 10.0))
    report = verify_release(manifest, against=candidate)
    failed = {f"{c.group}: {c.name}" for c in report.failures}
    assert "runtimes: transformers4: max_abs_logit_diff" in failed, failed
    assert "packaging: config.json: transformers 4 keys agree with v5's" in failed
    # the config's field-by-field comparison with the base (structure) sees the changed value too
    assert {c.group for c in report.failures} <= {"integrity", "structure", "packaging", "runtimes"}, failed
    # the control is the release fixture: the same release, untouched, passed this gate to be published


@needs_t4
def test_a_v5_only_release_fails_in_transformers4(inputs, t4_env, tmp_path: Path) -> None:
    """`output.compat: false` ships the v5 layout as the base has it: transformers 4 cannot load its
    tokenizer class, the very bug of issue 19; the gate says so and publishes nothing."""
    from mergekit_lite.pipeline import GateFailed

    base, adapter = inputs
    manifest = write_manifest(tmp_path, base, [adapter], "float32", compat=False, verify={**RUNTIMES, "logits": False})
    with pytest.raises(GateFailed) as failed:
        merge(manifest)
    assert failed.value.report.failures[0].group == "runtimes"
    assert "TokenizersBackend" in failed.value.report.failures[0].detail
    assert not (tmp_path / "out").exists()


def test_runtime_not_installed_is_refused_in_one_line(inputs, tmp_path: Path, monkeypatch) -> None:
    base, adapter = inputs
    m = write_manifest(tmp_path, base, [adapter], "float32", verify=RUNTIMES)
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere" / "python"))
    result = CliRunner().invoke(main, ["merge", str(m)])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: `verify.runtimes: [transformers4]`: no Python at") and "make runtimes" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"]
    # a Python with transformers 5 (this one) is not a transformers 4 runtime either
    monkeypatch.setenv(ENV, sys.executable)
    result = CliRunner().invoke(main, ["merge", str(m)])
    assert result.exit_code == 2 and "has transformers 5." in result.stderr, result.output


@pytest.mark.parametrize("arch", ["llama_seq_cls", "t5", "qwen2_vl"])
def test_runtimes_for_a_model_that_is_no_causal_lm_are_refused(arch: str, tmp_path: Path) -> None:
    """The runtime checks load and generate with a causal LM: asked of a classifier, an
    encoder-decoder or a vision-language release, the manifest is refused in one line naming the
    class, before anything is written (where before the gate failed the correct merge with
    'Unrecognized configuration class ... for AutoModelForCausalLM'). Control: the same manifest
    on a causal LM passes this point (it is then refused for the missing runtime, not the class)."""
    case = next(c for c in CASES if c.arch == arch)
    base = build_base(arch, tmp_path / "base")
    adapter = build_case_adapter(case, base, tmp_path / "adapter")
    work = tmp_path / "merge"
    work.mkdir()
    m = write_manifest(work, base, [adapter], "float32", verify={"runtimes": ["ctranslate2", "transformers4"]})
    result = CliRunner().invoke(main, ["merge", str(m)])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "the runtime checks run causal language models" in line and ARCHES[arch].model_class in line, line
    assert sorted(p.name for p in work.iterdir()) == ["manifest.yaml"]


def test_runtimes_for_a_causal_lm_pass_the_class_check(inputs, tmp_path: Path, monkeypatch) -> None:
    base, adapter = inputs
    m = write_manifest(tmp_path, base, [adapter], "float32", verify=RUNTIMES)
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere" / "python"))
    result = CliRunner().invoke(main, ["merge", str(m)])
    assert result.exit_code == 2 and "causal language models" not in result.stderr and "no Python at" in result.stderr
