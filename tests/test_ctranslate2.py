"""Issue 19, part 2: `verify.runtimes: [ctranslate2]`. The release converted by CTranslate2's own
converter and run by its Generator (float32, CPU) gives transformers 5's logits and greedy tokens;
a release whose RoPE setting CTranslate2 does not implement fails the check naming it; CTranslate2
not installed is refused in one line before anything is written.

Skipped when ctranslate2 is not installed, unless MERGEKIT_LITE_RUNTIME_TESTS=1 (CI installs it
with `make test`'s extras and sets that, so CI never skips it).
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
from mergekit_lite.pipeline import verify_release

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
CT2 = {"max_new_tokens": 4, "runtimes": ["ctranslate2"]}


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
