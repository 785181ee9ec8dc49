"""Issue 19, part 2: the serving lint. `mergekit-lite plan` says per adapter whether vLLM, SGLang and
TGI could serve it unmerged, from the one table of documented limits (plan/serving_limits.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.plan.serving import adapter_features, serving_lint, verdict
from mergekit_lite.plan.serving_limits import FEATURES, MODULES, RANKS, RUNTIMES
from mergekit_lite.sources.adapter import read_adapter

from helpers import write_manifest

# recipe -> (features found, verdicts of vLLM, SGLang, TGI)
CASES = {
    "llama_lora": ((), ("yes", "yes", "yes")),
    "llama_dora": (("dora",), ("no", "unknown", "no")),
    "llama_mts_lm_head": (("modules_to_save",), ("no", "unknown", "no")),
    "llama_tt_list": (("trainable_tokens",), ("no", "unknown", "no")),
    "qwen2_lora_bias": (("lora_bias",), ("no", "unknown", "no")),
    "llama_embed_lora": (("embedding_lora",), ("yes", "unknown", "no")),
    "llama_tied_lm_head_lora": (("lm_head_lora",), ("yes", "unknown", "no")),
    "gpt2_lora": ((), ("yes", "no", "no")),  # c_attn: a Conv1D that SGLang and TGI do not list
}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_lint_per_adapter(zoo, recipe: str) -> None:
    features, verdicts = CASES[recipe]
    adapter = read_adapter(zoo.adapter(recipe), 0, 1.0)
    [row] = serving_lint([adapter])
    assert tuple(row["features"]) == features
    assert tuple(row["runtimes"][r]["verdict"] for r in RUNTIMES) == verdicts, row
    for runtime, result in row["runtimes"].items():
        # a verdict other than yes gives its reasons, each citing its source; yes gives none
        assert bool(result["reasons"]) == (result["verdict"] != "yes"), (runtime, result)
        assert all(r["source"] for r in result["reasons"])


@pytest.mark.parametrize(
    ("rank", "expected"),
    [(8, "yes"), (16, "yes"), (17, "needs --max-lora-rank 32"), (512, "needs --max-lora-rank 512"), (513, "no")],
)
def test_vllm_rank_limit(rank: int, expected: str) -> None:
    """vLLM serves up to max_lora_rank (16 by default), and its flag takes fixed values up to 512."""
    assert verdict("vLLM", set(), rank, {"q_proj"})["verdict"] == expected
    assert verdict("SGLang", set(), rank, {"q_proj"})["verdict"] == "yes"  # sized from the adapters


def test_rank_is_read_from_the_factors(zoo) -> None:
    _, rank, modules = adapter_features(read_adapter(zoo.adapter("llama_patterns"), 0, 1.0))
    config = json.loads((zoo.adapter("llama_patterns") / "adapter_config.json").read_text())
    assert rank == max([config["r"], *config["rank_pattern"].values()])
    assert modules and "lm_head" not in modules


def test_the_table_is_complete_and_cited() -> None:
    """One row per runtime and feature, per runtime's rank and modules; every row names its source."""
    features = {f.feature for f in FEATURES}
    pairs = [(f.runtime, f.feature) for f in FEATURES]
    assert sorted(pairs) == sorted((r, f) for r in RUNTIMES for f in features)
    assert sorted(r.runtime for r in RANKS) == sorted(m.runtime for m in MODULES) == sorted(RUNTIMES)
    for row in (*FEATURES, *RANKS, *MODULES):
        assert row.source.strip(), row


def test_plan_cli_prints_the_lint(zoo, tmp_path: Path) -> None:
    base = zoo.base("llama")
    m = write_manifest(
        tmp_path, base, [(zoo.adapter("llama_lora"), None), (zoo.adapter("llama_dora"), None)], "float32"
    )
    text = CliRunner().invoke(main, ["plan", str(m)])
    assert text.exit_code == 0, text.output
    assert "serving   adapter 0 unmerged (r=8): vLLM yes; SGLang yes; TGI yes" in text.stdout
    assert "serving   adapter 1 unmerged (r=8, dora): vLLM no; SGLang unknown; TGI no" in text.stdout
    assert "vLLM: dora: refused at load" in text.stdout
    doc = json.loads(CliRunner().invoke(main, ["plan", str(m), "--json"]).stdout)
    assert [row["runtimes"]["vLLM"]["verdict"] for row in doc["serving"]] == ["yes", "no"]
