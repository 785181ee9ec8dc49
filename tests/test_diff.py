"""`mergekit-lite diff`: per-tensor relative change between two checkpoints."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from mergekit_lite import run_merge
from mergekit_lite.cli import main
from mergekit_lite.pipeline import prepare
from mergekit_lite.tools.diff import diff_checkpoints

from helpers import load_output, write_manifest


def test_diff_finds_exactly_the_changed_tensors(zoo, tmp_path: Path) -> None:
    base = zoo.base("llama")
    m = write_manifest(tmp_path, base, [(zoo.adapter("llama_lora"), None)], "float32")
    changed = {t.name for t in prepare(m).plan.tensors if t.changed}
    out = run_merge(m, verify=False)
    rows = diff_checkpoints(base, out)
    assert {r.name for r in rows if r.relative} == changed
    assert rows[0].relative == max(r.relative for r in rows)  # largest first
    a, b = load_output(base), load_output(out)
    name = rows[0].name
    expected = float((b[name].double() - a[name].double()).norm() / a[name].double().norm())
    assert abs(rows[0].relative - expected) < 1e-12


def test_diff_reports_resized_and_missing_tensors(zoo, tmp_path: Path) -> None:
    base = zoo.base("llama_tied")
    m = write_manifest(tmp_path, base, [(zoo.adapter("llama_tied_mts_lm_head"), None)], "float32")
    out = run_merge(m, verify=False)
    notes = {r.name: r.note for r in diff_checkpoints(base, out)}
    assert notes["lm_head.weight"] == "only in B"


def test_diff_cli_identical_checkpoints(zoo) -> None:
    base = str(zoo.base("llama"))
    result = CliRunner().invoke(main, ["diff", base, base])
    assert result.exit_code == 0
    assert "0 of " in result.output and "identical" in result.output
    bad = CliRunner().invoke(main, ["diff", base, "/nonexistent"])
    assert bad.exit_code == 2 and "is not a checkpoint folder" in bad.stderr
