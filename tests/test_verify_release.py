"""Issue 22, `verify` on a published release: its files are checked against SHA256SUMS and
release.json before anything else, and `verify DIR` checks a release folder against the
manifest.yaml it ships.

One gated bfloat16 release is built once (the gate tests' tiny Llama with a LoRA on every linear
layer). Tampered copies are made of it: a bit flipped in the bytes of a changed weight, the card
and the receipt edited, with SHA256SUMS left as published.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite import run_merge
from mergekit_lite.cli import main
from mergekit_lite.io.format import read_header
from mergekit_lite.pipeline import verify_release

from release_builders import (
    adapter_tensors,
    build_adapter,
    build_chat_base,
    build_tokenizer,
    copy_release,
    lora_delta,
    write_manifest,
    write_sha256sums,
)

FAST = {"max_new_tokens": 4}
UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, release folder) of one correct bfloat16 release."""
    root = tmp_path_factory.mktemp("verify-release")
    base = build_chat_base(root / "base", build_tokenizer())
    adapter = build_adapter(base, root / "adapter", seed=1, r=4, lora_alpha=8, target_modules="all-linear")
    manifest = write_manifest(root, base, [adapter], "bfloat16", verify=FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run_merge(manifest)
    return manifest, out


def flip_bit(folder: Path, name: str, element: int = 5, bit: int = 14) -> None:
    """Flip one bit of one element of tensor `name` in the shard's bytes (no rewrite of anything else).

    Bit 14 of a bfloat16 is the top exponent bit: 0.18 becomes about 6e37 or 1e-39 (as in the issue)."""
    shard = folder / "model.safetensors"
    entry = read_header(shard).tensors[name]
    offset = entry.begin + element * 2 + bit // 8
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ (1 << (bit % 8))]))


def tamper(folder: Path) -> None:
    """The issue's tampered copy: a bit flipped in a weight, README.md and release.json edited."""
    flip_bit(folder, UP)
    card = folder / "README.md"
    card.write_text(card.read_text().replace("# ", "# Totally reviewed: ", 1))
    receipt = json.loads((folder / "release.json").read_text())
    receipt["created"] = "2020-01-01T00:00:00+00:00"
    (folder / "release.json").write_text(json.dumps(receipt, indent=2) + "\n")


def integrity(report) -> dict[str, tuple[bool, str]]:
    return {c.name: (c.passed, c.detail) for c in report.checks if c.group == "integrity"}


def cli(*args: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(main, list(args))


def test_clean_release_passes_integrity_first(release) -> None:
    manifest, out = release
    report = verify_release(manifest, against=out)
    assert report.passed, [f"{c.group}: {c.name}: {c.detail}" for c in report.failures]
    assert [c.group for c in report.checks[:2]] == ["integrity", "integrity"]
    assert integrity(report) == {
        "SHA256SUMS matches the files": (True, ""),
        "release.json's output digests and sizes match": (True, ""),
    }


def test_tampered_copy_fails_on_integrity_naming_the_files(release, tmp_path: Path) -> None:
    manifest, out = release
    copy = copy_release(out, tmp_path / "copy")
    tamper(copy)
    report = verify_release(manifest, against=copy)
    assert not report.passed
    assert report.failures[0].group == "integrity"
    found = integrity(report)
    passed, detail = found["SHA256SUMS matches the files"]
    assert not passed
    for name in ("model.safetensors", "README.md", "release.json"):
        assert f"`{name}` does not match its SHA-256" in detail, detail
    passed, detail = found["release.json's output digests and sizes match"]
    assert not passed
    assert "`model.safetensors` does not match its recorded SHA-256" in detail, detail
    assert "`README.md` is " in detail, detail  # the edit changed its size


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda f: (f / "extra.txt").write_text("x"), "`extra.txt` is not listed"),
        (lambda f: (f / "verification.json").unlink(), "`verification.json` is listed but missing"),
        (lambda f: (f / "SHA256SUMS").unlink(), "no `SHA256SUMS`"),
    ],
    ids=["added", "removed", "no-sums"],
)
def test_files_added_or_removed_fail_integrity(release, tmp_path: Path, edit, expected: str) -> None:
    manifest, out = release
    copy = copy_release(out, tmp_path / "copy")
    edit(copy)
    report = verify_release(manifest, against=copy)
    passed, detail = integrity(report)["SHA256SUMS matches the files"]
    assert not passed and expected in detail, detail


def test_verify_dir_uses_the_release_manifest(release, tmp_path: Path) -> None:
    _, out = release
    clean = cli("verify", str(out))
    assert clean.exit_code == 0, clean.output
    rows = [line.split() for line in clean.stdout.splitlines()]
    assert ["ok", "integrity:", "SHA256SUMS", "matches", "the", "files", "0", "0"] in rows, clean.stdout
    assert "verification PASSED" in clean.stdout
    copy = copy_release(out, tmp_path / "copy")
    flip_bit(copy, UP)
    bad = cli("verify", str(copy))
    assert bad.exit_code == 1, bad.output
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: verification failed: integrity: SHA256SUMS matches the files; `model.safetensors`")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = cli("verify", str(empty))
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (
        f"error: `{empty}` is a folder without `manifest.yaml`; pass a release folder or a manifest file"
    )


# --------------------------------------------------------------------------- every element checked


def element_check(report):
    (check,) = [c for c in report.checks if c.group == "algebra" and c.name.startswith("every element")]
    return check


def bf16_at(folder: Path, name: str, element: int) -> float:
    import torch
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return float(f.get_tensor(name).view(-1)[element].to(torch.float64))


@pytest.mark.parametrize(
    ("bit", "caught"),
    [(13, True), (1, True), (0, False)],
    ids=["exponent-bit-as-in-the-issue", "two-ulp-mantissa-bit", "lowest-mantissa-bit-one-ulp"],
)
def test_bit_flip_resealed_fails_on_the_elementwise_check(release, tmp_path: Path, bit: int, caught: bool) -> None:
    """The bit flip with SHA256SUMS and release.json regenerated: integrity passes, and the elementwise
    check fails naming the tensor and the element, for any flip but of the lowest mantissa bit (one ulp,
    within the bound by design: see gate/elementwise.py)."""
    manifest, out = release
    copy = copy_release(out, tmp_path / "copy")
    before = bf16_at(out, UP, 5)
    flip_bit(copy, UP, element=5, bit=bit)
    after = bf16_at(copy, UP, 5)
    assert after != before
    write_sha256sums(copy)
    report = verify_release(manifest, against=copy)
    assert all(passed for passed, _ in integrity(report).values())
    check = element_check(report)
    print(f"\nbit {bit}: {before} -> {after}: {check.figure} ulps; {check.detail}")
    if not caught:
        assert check.passed and 0.5 < check.figure <= 1.5, check
        assert report.passed
        return
    assert not check.passed, check
    assert check.detail.startswith(f"worst: {UP}[0, 5] = {after:.9g}"), check.detail
    assert f"; 1 past the bound, in {UP};" in check.detail
    assert {c.group for c in report.failures} == {"algebra"}, [c.name for c in report.failures]


def test_clean_release_is_correctly_rounded_everywhere(release) -> None:
    """The control: every element of every changed tensor of a clean release is the correctly rounded
    W + delta (at most half an ulp from the float64 value)."""
    manifest, out = release
    check = element_check(verify_release(manifest, against=out))
    assert check.passed and check.figure == 0, check
    assert check.detail == "every one of 18432 elements in 14 tensors is the correctly rounded value", check.detail


# --------------------------------------------------------------------------- another tool's merge


@pytest.fixture(scope="module")
def peft_merged(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(manifest, adapter, PEFT's own bfloat16 merge_and_unload of it) for an adapter whose delta is
    many times the weight it changes (factors x4), so PEFT's two roundings, of the delta and of the
    sum, are several of the result's ulps where the delta cancels much of W."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft-merged")
    tokenizer = build_tokenizer()
    base = build_chat_base(root / "base", tokenizer)
    generation = json.loads((base / "generation_config.json").read_text())  # a base that stops at the chat EOS
    generation["eos_token_id"] = [generation["eos_token_id"], tokenizer.eos_token_id]
    (base / "generation_config.json").write_text(json.dumps(generation))
    adapter = build_adapter(base, root / "adapter", seed=3, r=8, lora_alpha=16, target_modules="all-linear")
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * 4 for k, v in load_file(weights).items()}, weights)
    manifest = write_manifest(root, base, [adapter], "bfloat16", verify=FAST)
    doc = yaml.safe_load(manifest.read_text())
    doc["output"]["compat"] = False  # PEFT writes transformers 5 configs only
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(root / "peft")
    for path in base.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(path, root / "peft" / path.name)
    return manifest, adapter, root / "peft"


def test_peft_merge_and_unload_passes_verify_against(peft_merged) -> None:
    """PEFT's own merge is a correct merge with another rounding convention: every check passes, and the
    integrity group, with nothing to check the folder's files against, is skipped saying why."""
    manifest, _, peft = peft_merged
    report = verify_release(manifest, against=peft)
    assert report.passed, [f"{c.group}: {c.name}: {c.detail}" for c in report.failures]
    assert "is not a mergekit-lite release" in report.skipped["integrity"]
    check = element_check(report)
    assert 0.5 < check.figure <= 1.5, check  # not correctly rounded (two roundings), within the bound
    # the case the bound's |delta| term is for: elements more than 1.5 of the result's own ulps off
    assert _beyond_result_ulps(manifest, peft) > 0


def test_peft_merge_of_another_weight_fails_verify_against(peft_merged, tmp_path: Path) -> None:
    """The negative control: PEFT's merge of the same adapter at weight 1.25 fails the weight checks."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifest, adapter, peft = peft_merged
    base = yaml_base(manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter)
        for module in model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {k: v * 1.25 for k, v in module.scaling.items()}
        model.merge_and_unload().save_pretrained(tmp_path / "wrong")
    for path in peft.iterdir():
        if not path.name.startswith(("model", "config")):
            shutil.copy2(path, tmp_path / "wrong" / path.name)
    report = verify_release(manifest, against=tmp_path / "wrong")
    assert not element_check(report).passed
    assert "algebra" in {c.group for c in report.failures}


def test_a_release_stripped_of_its_records_is_not_foreign(release, tmp_path: Path) -> None:
    """Only a folder named by --against may be another tool's: the manifest's own output without
    SHA256SUMS, release.json and manifest.yaml still fails integrity."""
    manifest, out = release
    copy = copy_release(out, tmp_path / "copy")
    for name in ("SHA256SUMS", "release.json", "manifest.yaml"):
        (copy / name).unlink()
    assert "integrity" in verify_release(manifest, against=copy).skipped  # named: judged by the weights
    moved = tmp_path / "moved"
    shutil.copytree(manifest.parent, moved, ignore=shutil.ignore_patterns(out.name))
    shutil.copytree(copy, moved / out.name)
    report = verify_release(moved / manifest.name)
    assert "integrity" not in report.skipped
    assert not integrity(report)["SHA256SUMS matches the files"][0]


def yaml_base(manifest: Path) -> Path:
    base = yaml.safe_load(manifest.read_text())["base"]
    path = Path(base if isinstance(base, str) else base["path"])
    return path if path.is_absolute() else (manifest.parent / path).resolve()


def _beyond_result_ulps(manifest: Path, folder: Path) -> int:
    """Elements of `folder`'s changed tensors more than 1.5 ulps (of the result) from W + delta (float64)."""
    import torch
    from safetensors import safe_open

    base = yaml_base(manifest)
    adapter = manifest.parent / "adapter"
    factors = adapter_tensors(adapter)
    beyond = 0
    with (
        safe_open(str(base / "model.safetensors"), "pt") as fb,
        safe_open(str(folder / "model.safetensors"), "pt") as fo,
    ):
        for name in fb.keys():
            if f"{name.removesuffix('.weight')}.lora_A.weight" not in factors:
                continue
            v = fb.get_tensor(name).to(torch.float64) + lora_delta(adapter, name)
            w = fo.get_tensor(name).to(torch.float64)
            ulp = torch.maximum(w.abs(), v.abs()).clamp_min(2.0**-126)
            ulp = torch.exp2(torch.floor(torch.log2(ulp)) - 7)
            beyond += int(((w - v).abs() > 1.5 * ulp).sum())
    return beyond
