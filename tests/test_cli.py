"""The CLI: bad input is one line and exit 2 with nothing written; every command has help."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_lite.cli import main

from helpers import write_manifest


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_clean_refusal(result, folder: Path, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not (folder / "out").exists()
    assert not list(folder.glob(".out.*")), "a staging folder was left behind"


def test_unknown_key(tmp_path: Path, zoo) -> None:
    m = write_manifest(tmp_path, zoo.base("llama"), [(zoo.adapter("llama_lora"), None)], "float32")
    m.write_text(m.read_text() + "outptu: x\n")
    assert_clean_refusal(run("merge", str(m)), tmp_path, "unknown key `outptu`; did you mean `output`?")


def test_missing_base(tmp_path: Path, zoo) -> None:
    m = write_manifest(tmp_path, tmp_path / "no-such-model", [(zoo.adapter("llama_lora"), None)], "float32")
    assert_clean_refusal(run("merge", str(m)), tmp_path, "no-such-model` does not exist")


def test_adapter_made_for_another_base(tmp_path: Path, zoo) -> None:
    m = write_manifest(tmp_path, zoo.base("llama"), [(zoo.adapter("gpt2_lora"), None)], "float32")
    assert_clean_refusal(
        run("merge", str(m)), tmp_path, "which the base model does not have (is the adapter made for another base?)"
    )


def test_adapter_with_other_shapes(tmp_path: Path, zoo) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    wider.save_pretrained(tmp_path / "wider")
    m = write_manifest(tmp_path, tmp_path / "wider", [(zoo.adapter("llama_lora"), None)], "float32")
    assert_clean_refusal(run("merge", str(m)), tmp_path, "which does not fit `model.layers.0")


def test_rank_disagrees_with_config(tmp_path: Path, zoo) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(zoo.adapter("llama_lora"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 4
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    m = write_manifest(tmp_path, zoo.base("llama"), [(adapter, None)], "float32")
    assert_clean_refusal(run("merge", str(m)), tmp_path, "has rank 8 in its tensors but adapter_config.json says r=4")


def test_missing_adapter_config(tmp_path: Path, zoo) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(zoo.adapter("llama_lora"), adapter)
    (adapter / "adapter_config.json").unlink()
    m = write_manifest(tmp_path, zoo.base("llama"), [(adapter, None)], "float32")
    assert_clean_refusal(run("merge", str(m)), tmp_path, "no adapter_config.json")


def test_pickle_only_adapter_is_refused(tmp_path: Path, zoo) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(zoo.adapter("llama_lora"), adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    m = write_manifest(tmp_path, zoo.base("llama"), [(adapter, None)], "float32")
    assert_clean_refusal(run("merge", str(m)), tmp_path, "only a pickle `adapter_model.bin`")


def test_output_inside_an_input(tmp_path: Path, zoo) -> None:
    base = tmp_path / "base"
    shutil.copytree(zoo.base("llama"), base)
    m = write_manifest(tmp_path, base, [(zoo.adapter("llama_lora"), None)], "float32", out_name="base/merged")
    result = run("merge", str(m))
    assert result.exit_code == 2
    assert "overlaps input" in result.stderr
    assert not (base / "merged").exists()


def test_existing_output_needs_overwrite(tmp_path: Path, zoo) -> None:
    m = write_manifest(tmp_path, zoo.base("llama"), [(zoo.adapter("llama_lora"), None)], "float32")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old release")
    result = run("merge", str(m))
    assert result.exit_code == 2
    assert "exists and is not empty; set `output.overwrite: true`" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "old release"


def test_plan_writes_nothing_and_prints_json(tmp_path: Path, zoo) -> None:
    m = write_manifest(tmp_path, zoo.base("llama"), [(zoo.adapter("llama_lora"), None)], "bfloat16")
    result = run("plan", str(m), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    changed = [t for t in plan["tensors"] if t["ops"]]
    assert changed and all(t["dtype"] == "BF16" for t in plan["tensors"])
    assert {op["kind"] for t in changed for op in t["ops"]} == {"delta"}
    assert plan["total_bytes"] == sum(2 * math.prod(t["shape"]) for t in plan["tensors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"]
    text = run("plan", str(m))
    assert text.exit_code == 0
    assert "model.layers.0.self_attn.q_proj.weight" in text.stdout and "a0 lora x2" in text.stdout


def test_merge_prints_plan_and_published_path(tmp_path: Path, zoo) -> None:
    m = write_manifest(tmp_path, zoo.base("llama"), [(zoo.adapter("llama_lora"), None)], "float32")
    result = run("merge", str(m))
    assert result.exit_code == 0, result.output
    assert f"published {(tmp_path / 'out').resolve()}" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output
