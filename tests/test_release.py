"""Issue 4, the release folder: it loads and generates offline with transformers, ships the right
tokenizer (an adapter's added tokens included), unties a trained lm_head, describes itself
(model card, release.json, SHA256SUMS), is reproducible, locked against a concurrent run, and
replaces an old release only once the new one has passed the gate.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_lite import run_merge
from mergekit_lite.gate.report import fmt
from mergekit_lite.io.format import read_header
from mergekit_lite.pipeline import GateFailed
from mergekit_lite.release.publish import output_lock

from release_builders import (
    EOS,
    INDEX,
    adapter_tensors,
    build_adapter,
    build_chat_base,
    build_tokenizer,
    read_release,
    sha256,
    write_manifest,
)

REPO = Path(__file__).resolve().parent.parent
FAST = {"max_new_tokens": 4}
ADDED = ["<tool_call>", "</tool_call>", "<think>"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def merge(manifest: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_merge(manifest)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A sharded tiny Llama with tokenizer and generation_config; a LoRA on all linear layers (no
    tokenizer: the base's ships); an adapter that adds tokens (resized, modules_to_save embed_tokens
    and lm_head, the grown tokenizer saved in the adapter folder)."""
    root = tmp_path_factory.mktemp("release-inputs")
    base = build_chat_base(root / "base", build_tokenizer(), max_shard_size="40KB")
    assert (base / INDEX).is_file(), "the base should be sharded"
    lora = build_adapter(base, root / "lora", seed=1, r=4, lora_alpha=8, target_modules="all-linear")
    grown = build_tokenizer(extra_tokens=ADDED)
    added = build_adapter(
        base,
        root / "added",
        seed=2,
        tokenizer=grown,
        resize_to=len(grown),
        perturb="modules_to_save",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    return {"base": base, "lora": lora, "added": added, "root": root}


@pytest.fixture(scope="module")
def bf16(inputs, tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, release): the LoRA merged in bfloat16, one file."""
    folder = tmp_path_factory.mktemp("bf16")
    m = write_manifest(folder, inputs["base"], [inputs["lora"]], "bfloat16", verify=FAST)
    return m, merge(m)


@pytest.fixture(scope="module")
def f32(inputs, tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, release): the LoRA merged in float32, sharded."""
    folder = tmp_path_factory.mktemp("f32")
    m = write_manifest(folder, inputs["base"], [inputs["lora"]], "float32", max_shard_size="24KB", verify=FAST)
    return m, merge(m)


@pytest.fixture(scope="module")
def added(inputs, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("added")
    m = write_manifest(folder, inputs["base"], [inputs["added"]], "float32", verify=FAST)
    return m, merge(m)


RELEASES = ["bf16", "f32", "added"]


@pytest.fixture
def release(request) -> tuple[Path, Path]:
    return request.getfixturevalue(request.param)


def load_model(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def load_tok(folder: Path):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(folder)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("release", RELEASES, indirect=True)
def test_release_loads_and_generates_offline(release) -> None:
    _, out = release
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = load_model(out, dtype="auto")
    tokenizer = load_tok(out)
    config = json.loads((out / "config.json").read_text())
    assert model.dtype == getattr(torch, config["dtype"])
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)


def test_added_tokens_agree_everywhere(inputs, added) -> None:
    _, out = added
    tokenizer = load_tok(out)
    config = json.loads((out / "config.json").read_text())
    tensors, _ = read_release(out)
    rows = tensors["model.embed_tokens.weight"].shape[0]
    assert len(tokenizer) == config["vocab_size"] == rows == tensors["lm_head.weight"].shape[0], (
        len(tokenizer),
        config["vocab_size"],
        rows,
    )
    assert len(tokenizer) == len(load_tok(inputs["base"])) + len(ADDED)
    vocab = tokenizer.get_vocab()
    assert all(token in vocab for token in ADDED)
    # the adapter's tokenizer, byte for byte, not the base's (tokenizer_config.json: made portable)
    for name in TOKENIZER_FILES:
        if (inputs["added"] / name).is_file() and name != "tokenizer_config.json":
            assert sha256(out / name) == sha256(inputs["added"] / name), name
    source, shipped = (json.loads((f / "tokenizer_config.json").read_text()) for f in (inputs["added"], out))
    assert source["tokenizer_class"] == "TokenizersBackend" and shipped["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert shipped["chat_template"] == (out / "chat_template.jinja").read_text()
    v5_only = ("tokenizer_class", "backend", "is_local", "local_files_only")
    assert {k: v for k, v in shipped.items() if k not in ("tokenizer_class", "chat_template")} == {
        k: v for k, v in source.items() if k not in v5_only
    }
    assert sha256(out / "tokenizer.json") != sha256(inputs["base"] / "tokenizer.json")
    # the trained rows are the adapter's modules_to_save tensors
    saved = adapter_tensors(inputs["added"])
    assert torch.equal(tensors["model.embed_tokens.weight"], saved["model.embed_tokens.weight"])
    assert torch.equal(tensors["lm_head.weight"], saved["lm_head.weight"])
    verification = json.loads((out / "verification.json").read_text())
    assert verification["passed"] is True
    model = load_model(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    new_id = tokenizer.convert_tokens_to_ids("<think>")
    assert new_id >= len(load_tok(inputs["base"]))
    assert tokenizer("<think> Hello")["input_ids"][0] == new_id


def test_tied_model_with_trained_lm_head_comes_out_untied(zoo, tmp_path: Path) -> None:
    base, adapter = zoo.base("llama_tied"), zoo.adapter("llama_tied_mts_lm_head")
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    out = merge(write_manifest(tmp_path, base, [adapter], "float32", verify=FAST))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    trained = adapter_tensors(adapter)["lm_head.weight"]
    embed = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(trained, embed)  # the adapter really trained lm_head away from the embedding
    model = load_model(out)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight.detach(), trained)
    assert torch.equal(model.get_input_embeddings().weight.detach(), embed)
    assert json.loads((out / "release.json").read_text())["plan"]["tie_word_embeddings"] == {
        "base": True,
        "release": False,
    }


# --------------------------------------------------------------------------- self-description


@pytest.mark.parametrize("release", RELEASES, indirect=True)
def test_sha256sums_check(release) -> None:
    _, out = release
    listed = {line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()}
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert listed == files - {"SHA256SUMS"}
    done = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _expected_inputs(inputs: dict[str, Path], adapter: str, tokenizer_from: str) -> set[Path]:
    base = inputs["base"]
    index = json.loads((base / INDEX).read_text())
    shards = {base / s for s in index["weight_map"].values()}
    assert len(shards) > 1
    found = shards | {
        base / INDEX,
        base / "config.json",
        base / "generation_config.json",
        inputs[adapter] / "adapter_config.json",
        inputs[adapter] / "adapter_model.safetensors",
    }
    source = inputs[tokenizer_from]
    found |= {source / n for n in TOKENIZER_FILES if (source / n).is_file()}
    return found


@pytest.mark.parametrize(
    ("release", "adapter", "tokenizer_from"),
    [("bf16", "lora", "base"), ("added", "added", "added")],
    indirect=["release"],
)
def test_receipt_lists_every_input_and_output(inputs, release, adapter: str, tokenizer_from: str) -> None:
    manifest, out = release
    receipt = json.loads((out / "release.json").read_text())
    assert not any(Path(r["path"]).is_absolute() for r in receipt["inputs"]), "a build-machine path"
    listed = {Path(os.path.normpath(manifest.parent / r["path"])): r for r in receipt["inputs"]}
    expected = _expected_inputs(inputs, adapter, tokenizer_from)
    assert expected <= set(listed), f"inputs missing from release.json: {sorted(map(str, expected - set(listed)))}"
    for path, record in listed.items():
        assert path.is_file(), path
        assert (record["size"], record["sha256"]) == (path.stat().st_size, sha256(path)), path
    outputs = {r["path"]: r for r in receipt["outputs"]}
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(outputs) == files - {"release.json", "SHA256SUMS"}
    for name, record in outputs.items():
        assert (record["size"], record["sha256"]) == ((out / name).stat().st_size, sha256(out / name)), name
    assert receipt["verification"] == {"passed": True, "verified": True}
    for library in ("mergekit-lite", "torch", "transformers", "peft", "safetensors"):
        assert receipt["versions"][library] not in ("", "not installed"), library
    plan = receipt["plan"]
    assert plan["total_size"] == sum(
        e.nbytes for shard in plan["shards"] for e in read_header(out / shard).tensors.values()
    )
    assert plan["shards"] == sorted({p.name for p in out.glob("*.safetensors")})


def test_rerun_gives_byte_identical_shards(f32, tmp_path: Path) -> None:
    manifest, first = f32
    again = tmp_path / "again.yaml"
    doc = manifest.read_text().replace("path: ./out", f"path: {tmp_path / 'again'}")
    assert doc != manifest.read_text()
    again.write_text(doc)
    second = merge(again)
    shards = sorted(p.name for p in first.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in second.glob("*.safetensors"))
    for name in [*shards, INDEX, "config.json", "generation_config.json", *TOKENIZER_FILES]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def _table_rows(card: str) -> list[str]:
    return [line for line in card.splitlines() if line.startswith("|")]


def test_model_card_names_everything(inputs, bf16) -> None:
    _, out = bf16
    card = (out / "README.md").read_text()
    config = json.loads((inputs["lora"] / "adapter_config.json").read_text())
    assert f"Base model `{inputs['base'].name}` (a local folder)" in card
    assert f"| 0 | `{inputs['lora'].name}` | lora | 4 | 8 | 1 |" in card
    for target in config["target_modules"]:
        assert target in card, target
    assert "- dtype: bfloat16" in card
    assert "verification passed" in card
    verification = json.loads((out / "verification.json").read_text())
    for check in verification["checks"]:
        name = f"{check['group']}: {check['name']}".replace("|", "\\|")
        figure = check["figure"] if check["figure_text"] is None else check["figure_text"]
        threshold = check["threshold"] if check["threshold_text"] is None else check["threshold_text"]
        assert f"{name} | {fmt(figure)} | {fmt(threshold)} |" in card, check
    assert "NOT VERIFIED" not in card and "- not-verified" not in card


def test_model_card_tables_are_well_formed(bf16) -> None:
    """Every row of the card's Markdown tables has as many cells as its header (no stray `|`)."""
    _, out = bf16
    card = (out / "README.md").read_text()
    bad = []
    header_cells = None
    for line in card.splitlines():
        if not line.startswith("|"):
            header_cells = None
            continue
        cells = len(re.findall(r"(?<!\\)\|", line)) - 1
        if header_cells is None:
            header_cells = cells
        elif cells != header_cells:
            bad.append(f"{cells} cells instead of {header_cells}: {line}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("release", RELEASES, indirect=True)
def test_generation_config_has_the_tokenizer_eos(inputs, release) -> None:
    _, out = release
    tokenizer = load_tok(out)
    assert tokenizer.eos_token == EOS
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    ids = eos if isinstance(eos, list) else [eos]
    base_eos = json.loads((inputs["base"] / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.eos_token_id in ids and base_eos in ids and tokenizer.eos_token_id != base_eos


@pytest.mark.parametrize("release", RELEASES, indirect=True)
def test_config_is_dense_and_its_dtype_matches(release) -> None:
    _, out = release
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    tensors, _ = read_release(out)
    dtypes = {t.dtype for t in tensors.values()}
    assert dtypes == {getattr(torch, config["dtype"])}
    assert "torch_dtype" not in config or config["torch_dtype"] == config["dtype"]


# --------------------------------------------------------------------------- concurrency and overwrite


def test_second_concurrent_run_is_refused(inputs, tmp_path: Path) -> None:
    m = write_manifest(tmp_path, inputs["base"], [inputs["lora"]], "bfloat16", verify=FAST)
    output = (tmp_path / "out").resolve()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with output_lock(output):
        done = subprocess.run(
            [sys.executable, "-m", "mergekit_lite", "merge", str(m)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 75, done.stdout + done.stderr  # busy: retryable, not bad input
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: output `{output}` is being written by another run (pid {os.getpid()}); wait for it"
        )
        assert "Traceback" not in done.stderr
        assert done.stdout == "", "nothing (no plan) is printed before the lock is known to be free"
        assert not output.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "manifest.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"]  # the lock goes with its holder
    assert merge(m) == output  # and the next run proceeds


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (sha256(p), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def old_release(inputs, tmp_path: Path) -> Path:
    """A published bfloat16 release (one file) with a file of its own, at tmp_path/out."""
    out = merge(write_manifest(tmp_path, inputs["base"], [inputs["lora"]], "bfloat16", verify=FAST))
    (out / "old-only.txt").write_text("from the old release\n")
    return out


def test_overwrite_keeps_the_old_release_when_the_gate_fails(inputs, old_release: Path, tmp_path: Path) -> None:
    before = _snapshot(old_release)
    m = write_manifest(
        tmp_path,
        inputs["base"],
        [inputs["lora"]],
        "float32",
        max_shard_size="24KB",
        overwrite=True,
        verify={**FAST, "thresholds": {"top1_agreement": 1.1}},
    )
    with pytest.raises(GateFailed):
        merge(m)
    assert _snapshot(old_release) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml", "out"]


def test_overwrite_replaces_the_old_release_whole(inputs, old_release: Path, tmp_path: Path) -> None:
    m = write_manifest(
        tmp_path, inputs["base"], [inputs["lora"]], "float32", max_shard_size="24KB", overwrite=True, verify=FAST
    )
    assert merge(m) == old_release
    files = {str(p.relative_to(old_release)) for p in old_release.rglob("*") if p.is_file()}
    listed = {line.split("  ", 1)[1] for line in (old_release / "SHA256SUMS").read_text().splitlines()}
    assert files == listed | {"SHA256SUMS"}, f"left from the old release: {sorted(files - listed - {'SHA256SUMS'})}"
    assert "old-only.txt" not in files and "model.safetensors" not in files  # the old one-file bf16 weights
    assert json.loads((old_release / "config.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml", "out"]
    done = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=old_release, capture_output=True)
    assert done.returncode == 0


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_and_receipt_carry_no_build_machine_path(inputs, bf16) -> None:
    """What a reviewer reads: no absolute path of the machine that built the release; front matter a
    hub accepts; usage snippets; which tokenizer shipped."""
    manifest, out = bf16
    card = (out / "README.md").read_text()
    receipt = (out / "release.json").read_text()
    for path in (inputs["base"], inputs["lora"], manifest.parent):
        assert str(path) not in card, path
        assert str(path) not in receipt, path
    front = _front_matter(card)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert "base_model" not in front, "a local base with no hub id in its config has no base_model"
    assert front["tags"] == ["mergekit-lite", "lora", "merge"]
    assert 'AutoModelForCausalLM.from_pretrained("./out", dtype="auto")' in card
    assert "vllm serve ./out\n" in card
    assert f"- tokenizer: the base's (`{inputs['base'].name}`), copied byte for byte" in card


def test_model_card_license_base_model_and_not_verified(inputs, tmp_path: Path) -> None:
    """license from the base's card, else its config, else the manifest; base_model from the hub id
    the local base's config names; `not-verified` among the tags of an unverified release."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(inputs["base"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/tiny-llama", "license": "mit"}))

    def card(out_name: str) -> dict:
        m = write_manifest(
            tmp_path, base, [inputs["lora"]], "bfloat16", out_name=out_name, verify={"enabled": False}, license="other"
        )
        return _front_matter((merge(m) / "README.md").read_text())

    front = card("out")
    assert front["base_model"] == "org/tiny-llama" and front["license"] == "mit"
    assert front["tags"] == ["mergekit-lite", "lora", "merge", "not-verified"]
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    front = card("b")
    assert front["license"] == "apache-2.0"
    (base / "README.md").unlink()
    (base / "config.json").write_text(json.dumps(config))
    front = card("c")
    assert front["license"] == "other" and "base_model" not in front


def test_reports_say_when_by_what_from_which_manifest_on_which_prompts(bf16) -> None:
    manifest, out = bf16
    report = json.loads((out / "verification.json").read_text())
    context = report["context"]
    assert report["timestamp"] and report["tool"]["name"] == "mergekit-lite" and report["tool"]["version"]
    assert context["manifest_sha256"] == sha256(manifest)
    from mergekit_lite.gate.endtoend import DEFAULT_PROMPTS

    assert context["prompts"] == list(DEFAULT_PROMPTS)
