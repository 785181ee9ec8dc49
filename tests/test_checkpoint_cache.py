"""The embedding names a checkpoint's architecture gives, cached: a rerun builds no model and imports no transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_lite.sources import architecture, checkpoint
from mergekit_lite.sources.checkpoint import ARCH_FILE, read_checkpoint

EXPECTED = {  # kind -> (tied, input_embedding, output_embedding)
    "llama": (False, "model.embed_tokens.weight", "lm_head.weight"),
    "llama_tied": (True, "model.embed_tokens.weight", "lm_head.weight"),
    "gpt2": (True, "transformer.wte.weight", "lm_head.weight"),
    "qwen2": (False, "model.embed_tokens.weight", "lm_head.weight"),
}

PROBE = """
import json, sys
from pathlib import Path
from mergekit_lite.sources.checkpoint import read_checkpoint
c = read_checkpoint(Path(sys.argv[1]))
print(json.dumps([c.tied, c.input_embedding, c.output_embedding, "transformers" in sys.modules]))
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(folder))
    return folder


class Builds:
    """Counts the meta models built (architecture.meta_model); with `fail`, each one raises."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        self.count = 0
        original = architecture.meta_model

        def meta_model(*args, **kwargs):
            self.count += 1
            if fail:
                raise RuntimeError("the meta model must not be built")
            return original(*args, **kwargs)

        monkeypatch.setattr(architecture, "meta_model", meta_model)


def embeddings(path: Path) -> tuple[bool, str | None, str | None]:
    c = read_checkpoint(path)
    return c.tied, c.input_embedding, c.output_embedding


def entries(cache: Path) -> dict:
    return json.loads((cache / ARCH_FILE).read_text())


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "gpt2", "qwen2"])
def test_second_read_takes_the_embeddings_from_the_cache(zoo, cache: Path, kind: str, monkeypatch) -> None:
    base = zoo.base(kind)
    first = embeddings(base)
    assert first == EXPECTED[kind]
    assert len(entries(cache)) == 1
    builds = Builds(monkeypatch, fail=True)
    assert embeddings(base) == first
    assert builds.count == 0
    # negative control: with an empty cache the same patch is reached, and the names are guessed
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(cache.parent / "empty"))
    embeddings(base)
    assert builds.count == 1
    assert not (cache.parent / "empty" / ARCH_FILE).exists()  # a failed build is not cached


def test_a_failed_build_is_not_cached(zoo, cache: Path, monkeypatch) -> None:
    base = zoo.base("llama")
    with monkeypatch.context() as patch:
        failing = Builds(patch, fail=True)
        assert embeddings(base) == EXPECTED["llama"]  # guessed from the tensor names
        assert failing.count == 1
    assert not (cache / ARCH_FILE).exists()
    builds = Builds(monkeypatch)
    assert embeddings(base) == EXPECTED["llama"]
    assert builds.count == 1  # built this time, and only now cached (control)
    assert len(entries(cache)) == 1


@pytest.mark.parametrize("setting", ["warm", "off"])
def test_a_warm_cache_keeps_transformers_out_of_a_fresh_process(zoo, cache: Path, setting: str) -> None:
    base = zoo.base("gpt2")
    assert embeddings(base) == EXPECTED["gpt2"]  # warms the cache
    env = dict(os.environ, MERGEKIT_LITE_CACHE=str(cache) if setting == "warm" else "off")
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(base)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    tied, inp, out, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert (tied, inp, out) == EXPECTED["gpt2"]
    assert imported is (setting == "off")  # negative control: with the cache off, transformers is imported


def test_an_edited_config_misses_the_cache(zoo, cache: Path, tmp_path: Path, monkeypatch) -> None:
    base = tmp_path / "base"
    shutil.copytree(zoo.base("llama_tied"), base)
    assert embeddings(base) == EXPECTED["llama_tied"]
    builds = Builds(monkeypatch)
    assert embeddings(base) == EXPECTED["llama_tied"]
    assert builds.count == 0  # control: unchanged, a hit
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (base / "config.json").write_text(json.dumps(config))
    tied, inp, _ = embeddings(base)
    assert (tied, inp, builds.count) == (False, "model.embed_tokens.weight", 1)
    assert len(entries(cache)) == 2


def test_another_transformers_version_misses_the_cache(zoo, cache: Path, monkeypatch) -> None:
    base = zoo.base("qwen2")
    installed = checkpoint._transformers_version()
    assert embeddings(base) == EXPECTED["qwen2"]
    builds = Builds(monkeypatch)
    assert embeddings(base) == EXPECTED["qwen2"]
    assert builds.count == 0  # control: same version, a hit
    monkeypatch.setattr(checkpoint, "_transformers_version", lambda: "0.0.0+other")
    assert embeddings(base) == EXPECTED["qwen2"]
    assert builds.count == 1
    versions = [k.split("transformers==", 1)[1].split("|")[0] for k in entries(cache)]
    assert sorted(versions) == sorted([installed, "0.0.0+other"])


def test_other_rules_miss_the_cache(zoo, cache: Path, monkeypatch) -> None:
    """An answer cached under older rules of describe (a mergekit-lite that chose another class) is
    not reused."""
    base = zoo.base("qwen2")
    assert embeddings(base) == EXPECTED["qwen2"]
    builds = Builds(monkeypatch)
    assert embeddings(base) == EXPECTED["qwen2"] and builds.count == 0  # control: a hit
    monkeypatch.setattr(checkpoint, "ARCHITECTURE_RULES", checkpoint.ARCHITECTURE_RULES + 1)
    assert embeddings(base) == EXPECTED["qwen2"]
    assert builds.count == 1


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[1, 2]",
        '{"key": 3}',
        "",
        pytest.param("[" * 100_000, id="nested too deeply"),
        "right key, wrong value",
    ],
)
def test_a_corrupt_cache_is_ignored_and_rewritten(zoo, cache: Path, content: str, monkeypatch) -> None:
    base = zoo.base("gpt2")
    if content == "right key, wrong value":
        names = list(checkpoint.read_tensors(base)[1])
        content = json.dumps({checkpoint._architecture_key(base, names, None): [True, "model.embed_tokens.weight"]})
    cache.mkdir()
    (cache / ARCH_FILE).write_text(content)
    builds = Builds(monkeypatch)
    assert embeddings(base) == EXPECTED["gpt2"]
    assert builds.count == 1  # the corrupt file gave nothing
    cached = [(v["tied"], v["input_embedding"], v["output_embedding"]) for v in entries(cache).values()]
    assert cached == [(True, "transformer.wte.weight", "lm_head.weight")]
    assert embeddings(base) == EXPECTED["gpt2"]
    assert builds.count == 1  # control: the rewritten file is a hit


def test_an_unwritable_cache_is_ignored(zoo, tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(blocker))
    builds = Builds(monkeypatch)
    for _ in range(2):
        assert embeddings(zoo.base("llama")) == EXPECTED["llama"]
    assert builds.count == 2  # nothing could be kept, so each read builds
    assert blocker.read_text() == ""


def test_cache_off_writes_no_file(zoo, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", "off")
    builds = Builds(monkeypatch)
    for _ in range(2):
        assert embeddings(zoo.base("llama")) == EXPECTED["llama"]
    assert builds.count == 2
    assert not (tmp_path / "xdg").exists()
    monkeypatch.delenv("MERGEKIT_LITE_CACHE")  # negative control: the default folder is written
    embeddings(zoo.base("llama"))
    assert len(json.loads((tmp_path / "xdg" / "mergekit-lite" / ARCH_FILE).read_text())) == 1
