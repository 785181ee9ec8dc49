"""The plan: header-only, every adapter tensor claimed once, tied embeddings reconciled."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from mergekit_lite.pipeline import prepare

from helpers import write_manifest


def test_plan_reads_no_tensor_data(zoo, tmp_path: Path, monkeypatch) -> None:
    import mergekit_lite.io.reader as reader

    def forbidden(*args, **kwargs):
        raise AssertionError("the plan read tensor data")

    monkeypatch.setattr(reader, "safe_open", forbidden)
    m = write_manifest(tmp_path, zoo.base("llama"), [(zoo.adapter("llama_dora"), None)], "bfloat16")
    plan = prepare(m, for_output=False).plan  # (a merge then also reads the small adapter tensors for NaN/Inf)
    assert any(op.kind == "dora" for t in plan.tensors for op in t.ops)


def test_every_adapter_tensor_is_claimed_exactly_once(zoo, tmp_path: Path) -> None:
    for name in ("llama_lora", "llama_dora", "qwen2_bias_all", "llama_resized", "llama_tied_tt_list"):
        adapter = zoo.adapter(name)
        base = zoo.base({"qwen2_bias_all": "qwen2", "llama_tied_tt_list": "llama_tied"}.get(name, "llama"))
        plan = prepare(write_manifest(tmp_path / name, base, [(adapter, None)], "float32")).plan
        claimed = [k for t in plan.tensors for op in t.ops for k in op.keys]
        # rows mirrored onto a tied lm_head read the same key twice, by design
        mirrored = [
            k for t in plan.tensors if t.name == "lm_head.weight" for op in t.ops if op.kind == "rows" for k in op.keys
        ]
        from safetensors import safe_open

        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert sorted(set(claimed) | set(plan.accounted)) == sorted(keys), name
        assert len(claimed) - len(mirrored) + len(plan.accounted) == len(keys), name


def test_tied_checkpoint_that_stores_both_embeddings_is_untied_when_one_changes(zoo, tmp_path: Path) -> None:
    base = tmp_path / "tied-both"
    shutil.copytree(zoo.base("llama_tied"), base)
    tensors = load_file(base / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    untouched = prepare(write_manifest(tmp_path / "a", base, [(zoo.adapter("llama_lora"), None)], "float32")).plan
    assert untouched.tied_out is True
    changed = prepare(
        write_manifest(tmp_path / "b", base, [(zoo.adapter("llama_tied_embed_lora"), None)], "float32")
    ).plan
    assert changed.tied_out is False
    ops = {t.name: [op.kind for op in t.ops] for t in changed.tensors}
    assert ops["lm_head.weight"] == [] and "delta" in ops["model.embed_tokens.weight"]
