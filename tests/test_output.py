"""The written release: shard names and sizes, an exact index, byte copies, config, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

import mergekit_lite.merge.merge as merge_module
from mergekit_lite import run_merge
from mergekit_lite.errors import MergeError
from mergekit_lite.io.format import read_header
from mergekit_lite.sizes import parse_size

from helpers import write_manifest


@pytest.fixture(scope="module")
def sharded(zoo, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sharded")
    m = write_manifest(
        folder, zoo.base("llama"), [(zoo.adapter("llama_lora"), None)], "bfloat16", max_shard_size="20KB"
    )
    return run_merge(m), zoo.base("llama")


def test_shards_respect_the_limit_and_names(sharded) -> None:
    out, _ = sharded
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    limit = parse_size("20KB")
    for shard in shards:
        header = read_header(out / shard)  # strict: contiguous offsets, exact length
        sizes = [e.nbytes for e in header.tensors.values()]
        assert sum(sizes) <= limit or len(sizes) == 1


def test_index_is_exact_both_ways(sharded) -> None:
    out, _ = sharded
    index = json.loads((out / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    total = 0
    for shard in set(index["weight_map"].values()):
        for name, entry in read_header(out / shard).tensors.items():
            seen[name] = shard
            total += entry.nbytes
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total


def test_unchanged_tensors_are_byte_copies(zoo, tmp_path: Path) -> None:
    base = zoo.base("llama")
    out = run_merge(write_manifest(tmp_path, base, [(zoo.adapter("llama_lora"), None)], "auto"))
    base_header = read_header(base / "model.safetensors")
    out_header = read_header(out / "model.safetensors")
    untouched = [n for n in base_header.tensors if "norm" in n or "embed" in n]
    assert untouched
    for name in untouched:
        a, b = base_header.tensors[name], out_header.tensors[name]
        with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
            fa.seek(a.begin)
            fb.seek(b.begin)
            assert fa.read(a.nbytes) == fb.read(b.nbytes), name
    # and the changed ones did change (the control for the comparison above)
    with safe_open(str(base / "model.safetensors"), "pt") as fa, safe_open(str(out / "model.safetensors"), "pt") as fb:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not fa.get_tensor(name).equal(fb.get_tensor(name))


def test_config_dtype_follows_the_output(sharded) -> None:
    out, base = sharded
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["torch_dtype"] == "bfloat16"  # transformers 4's name (output.compat), never the base's stale value
    assert config["architectures"] == base_config["architectures"]
    for shard in out.glob("model-*.safetensors"):
        assert {e.dtype for e in read_header(shard).tensors.values()} == {"BF16"}


@pytest.mark.parametrize("fail_after", [0, 5, 12])
def test_failure_midway_leaves_nothing(zoo, tmp_path: Path, monkeypatch, fail_after: int) -> None:
    calls = {"n": 0}
    real = merge_module.merge_tensor

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > fail_after:
            raise MergeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_module, "merge_tensor", flaky)
    m = write_manifest(
        tmp_path / "job",
        zoo.base("llama"),
        [(zoo.adapter("llama_lora"), None)],
        "bfloat16",
        out_name="dist/release",
        max_shard_size="20KB",
    )
    with pytest.raises(MergeError, match="injected"):
        run_merge(m)
    assert calls["n"] == fail_after + 1
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["manifest.yaml"], "staging or parents left behind"


def test_overwrite_replaces_a_previous_release(zoo, tmp_path: Path) -> None:
    m = write_manifest(tmp_path, zoo.base("llama"), [(zoo.adapter("llama_lora"), None)], "float32")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    (tmp_path / "out" / "release.json").write_text('{"outputs": []}')  # a release: only such a folder is replaced
    m.write_text(m.read_text().replace("path: ./out", "path: ./out\n  overwrite: true"))
    out = run_merge(m)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "SHA256SUMS",
        "config.json",
        "generation_config.json",
        "manifest.yaml",
        "model.safetensors",
        "release.json",
        "verification.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml", "out"]
