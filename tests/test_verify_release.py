"""Issue 22, `verify` on a published release: its files are checked against SHA256SUMS and
release.json before anything else, and `verify DIR` checks a release folder against the
manifest.yaml it ships.

One gated bfloat16 release is built once (the gate tests' tiny Llama with a LoRA on every linear
layer). Tampered copies are made of it: a bit flipped in the bytes of a changed weight, the card
and the receipt edited, with SHA256SUMS left as published.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_lite import run_merge
from mergekit_lite.cli import main
from mergekit_lite.io.format import read_header
from mergekit_lite.pipeline import verify_release

from release_builders import (
    build_adapter,
    build_chat_base,
    build_tokenizer,
    copy_release,
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
