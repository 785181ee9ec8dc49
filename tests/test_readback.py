"""Issue 20, the release read back once: the gate's per-tensor checks and the digests of SHA256SUMS and
release.json come from one read of each shard, from disk.

A gated merge does not hash the shards as it writes them; the gate's algebra reads every shard back
once, checks its tensors and hashes the same bytes (io/readback.py). So a byte changed between the
write and the read-back is either caught by the checks (the gate fails, nothing is published) or is
in the recorded digest (SHA256SUMS matches the disk). `verify` gets the shards' digests for its
integrity checks from the same read.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergekit_lite.gate.integrity as integrity_module
import mergekit_lite.io.digests as digests_module
from mergekit_lite import run_merge
from mergekit_lite.io import writer as writer_module
from mergekit_lite.io.format import read_header
from mergekit_lite.io.readback import HashedReads
from mergekit_lite.io.reader import AlignedBuffer
from mergekit_lite.pipeline import GateFailed, verify_release

from release_builders import build_adapter, build_chat_base, build_tokenizer, copy_release, write_manifest

CHANGED = "mlp.up_proj.weight"  # a tensor the all-linear adapter changes, in every layer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(folder, base, adapter): a tiny bf16 Llama and an all-linear LoRA."""
    root = tmp_path_factory.mktemp("readback")
    base = build_chat_base(root / "base", build_tokenizer())
    adapter = build_adapter(base, root / "adapter", seed=3, r=4, lora_alpha=8, target_modules="all-linear")
    return root, base, adapter


def manifest_for(inputs, name: str) -> Path:
    """A manifest of its own (output `name`), the output in several shards, the gate without logits."""
    root, base, adapter = inputs
    return write_manifest(
        root,
        base,
        [adapter],
        "bfloat16",
        out_name=name,
        max_shard_size="10KB",
        name=f"{name}.yaml",
        verify={"logits": False},
    )


def flip(path: Path, name: str, bit: int, element: int = 5) -> None:
    """Flip one bit of one bfloat16 element of tensor `name` in the file."""
    entry = read_header(path).tensors[name]
    offset = entry.begin + element * 2 + bit // 8
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ (1 << (bit % 8))]))


def corrupt_after_write(monkeypatch, bit: int) -> set[str]:
    """Every shard, once written and fsync'd, gets `bit` flipped in each changed tensor it holds (before
    anything reads it back); returns the names of the shards changed."""
    close = writer_module.ShardWriter.close
    hit: set[str] = set()

    def close_then_flip(self) -> None:
        close(self)
        for name, _, _ in self.entries:
            if name.endswith(CHANGED):
                flip(self.path, name, bit)
                hit.add(self.path.name)

    monkeypatch.setattr(writer_module.ShardWriter, "close", close_then_flip)
    return hit


def sums(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines}


def on_disk(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def merge(manifest: Path, verify: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_merge(manifest, verify=verify)


def shards_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- a gated merge


def test_gated_merge_hashes_each_shard_once_from_the_read_back(inputs, monkeypatch) -> None:
    """No shard is hashed as it is written nor read again for the receipt: the digests recorded are
    the read-back's, and they are the files' on disk."""
    writers: list[bool] = []
    init = writer_module.ShardWriter.__init__

    def spy_init(self, path, entries, metadata, digest=False):  # noqa: ANN001
        writers.append(digest)
        init(self, path, entries, metadata, digest)

    hashed: list[Path] = []
    sha256_file = digests_module.sha256_file

    def spy_sha256(path, *args, **kwargs):  # noqa: ANN001
        hashed.append(Path(path))
        return sha256_file(path, *args, **kwargs)

    finished: list[dict[Path, str]] = []
    finish = HashedReads.finish

    def spy_finish(self) -> dict[Path, str]:
        found = finish(self)
        finished.append(found)
        return found

    monkeypatch.setattr(writer_module.ShardWriter, "__init__", spy_init)
    monkeypatch.setattr(digests_module, "sha256_file", spy_sha256)
    monkeypatch.setattr(HashedReads, "finish", spy_finish)
    out = merge(manifest_for(inputs, "gated"))
    shards = shards_of(out)
    assert len(shards) >= 2 and writers == [False] * len(shards)
    assert not [p for p in hashed if p.name in {s.name for s in shards}], hashed  # no second hash pass
    (found,) = finished  # one read-back
    assert sorted(p.name for p in found) == [s.name for s in shards]
    recorded = {o["path"]: o["sha256"] for o in json.loads((out / "release.json").read_text())["outputs"]}
    for shard in shards:
        assert sums(out)[shard.name] == recorded[shard.name] == on_disk(shard)
        assert found[next(p for p in found if p.name == shard.name)] == on_disk(shard)


@pytest.mark.parametrize(
    ("bit", "fails"),
    [(14, True), (None, False)],
    ids=["exponent-bit-flipped-after-the-write", "control-untouched"],
)
def test_a_byte_changed_after_the_write_fails_the_gate(inputs, monkeypatch, bit: int | None, fails: bool) -> None:
    """The gate checks the bytes read back from disk, not the ones the merge held: a flip between the
    write and the read-back fails it and nothing is published; untouched, the same merge passes."""
    name = f"flip-{bit}"
    manifest = manifest_for(inputs, name)
    hit = corrupt_after_write(monkeypatch, bit) if bit is not None else set()
    if not fails:
        assert merge(manifest).is_dir()
        return
    with pytest.raises(GateFailed) as info:
        merge(manifest)
    assert hit
    failed = {c.group for c in info.value.report.failures}
    assert "algebra" in failed, [c.name for c in info.value.report.failures]
    assert not (inputs[0] / name).exists()


@pytest.mark.parametrize(("verify", "matches"), [(True, True), (False, False)], ids=["gated", "control-no-verify"])
def test_recorded_digests_are_of_the_bytes_on_disk(inputs, monkeypatch, verify: bool, matches: bool) -> None:
    """The lowest mantissa bit flipped after the write (one ulp: within the elementwise bound by design,
    so the gate passes): a gated release's SHA256SUMS and release.json still match its files, being the
    read-back's. The control: --no-verify records the digests hashed as the bytes went out, which the
    flip makes wrong, so this test can tell the two apart."""
    out = inputs[0] / f"ulp-{verify}"
    hit = corrupt_after_write(monkeypatch, 0)
    merge(manifest_for(inputs, out.name), verify=verify)
    assert hit
    recorded = {o["path"]: o["sha256"] for o in json.loads((out / "release.json").read_text())["outputs"]}
    for shard in shards_of(out):
        if shard.name not in hit:
            assert sums(out)[shard.name] == on_disk(shard)
            continue
        assert (sums(out)[shard.name] == on_disk(shard)) is matches
        assert (recorded[shard.name] == on_disk(shard)) is matches


# --------------------------------------------------------------------------- verify


def test_verify_hashes_the_shards_only_in_the_algebra_read(inputs, monkeypatch, tmp_path: Path) -> None:
    """`verify` reads each shard once: its integrity checks take the shards' digests from the algebra's
    read-back (no sha256_file of a shard), still come first, and still fail on a flipped bit."""
    out = merge(manifest_for(inputs, "verified"))
    hashed: list[Path] = []
    sha256_file = integrity_module.sha256_file

    def spy(path, *args, **kwargs):  # noqa: ANN001
        hashed.append(Path(path))
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(integrity_module, "sha256_file", spy)
    report = verify_release(out)
    assert report.passed, [f"{c.group}: {c.name}: {c.detail}" for c in report.failures]
    assert [c.group for c in report.checks[:2]] == ["integrity", "integrity"]
    assert hashed and not [p for p in hashed if p.suffix == ".safetensors"], hashed
    copy = copy_release(out, tmp_path / "copy")
    shard, name = next((s, n) for s in shards_of(copy) for n in read_header(s).tensors if n.endswith(CHANGED))
    flip(shard, name, 0)  # one ulp: only the digest can see it
    report = verify_release(copy)
    assert report.failures and report.failures[0].group == "integrity"
    assert f"`{shard.name}` does not match its SHA-256" in report.failures[0].detail


# --------------------------------------------------------------------------- HashedReads


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(300 + 1000 * i, generator=gen) for i in range(4)}  # odd sizes: blocks straddled
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def read_back(path: Path, names: list[str], mapped: tuple[str, ...] = ()) -> dict[Path, str]:
    reads = HashedReads(read_header(path).tensors)
    buffer = AlignedBuffer()
    for name in names:
        if name in mapped:
            reads.hash_mapped(name, reads.get(name))
        else:
            reads.load_into(name, buffer, direct=True)
    return reads.finish()


@pytest.mark.parametrize(
    ("names", "mapped"),
    [(["t0", "t1", "t2", "t3"], ()), (["t1", "t3"], ()), (["t0", "t2"], ("t2",)), ([], ())],
    ids=["every-tensor", "gaps-read-and-hashed", "mapped-tensor", "none-read"],
)
def test_hashed_reads_give_the_file_digest(shard: Path, names: list[str], mapped: tuple[str, ...]) -> None:
    assert read_back(shard, names, mapped) == {shard: on_disk(shard)}


def test_hashed_reads_hash_the_bytes_between_the_tensors_read(shard: Path) -> None:
    """The control for the gaps: a byte changed in a tensor that is not read changes the digest."""
    before = read_back(shard, ["t1", "t3"])[shard]
    entry = read_header(shard).tensors["t2"]
    with open(shard, "r+b") as fh:
        fh.seek(entry.begin + 7)
        fh.write(b"\x7f")
    after = read_back(shard, ["t1", "t3"])[shard]
    assert after != before and after == on_disk(shard)


def test_hashed_reads_out_of_order_give_no_digest(shard: Path) -> None:
    """Tensors read out of file order cannot be hashed in one pass: no digest (the caller hashes the file)."""
    assert read_back(shard, ["t2", "t1"]) == {}


def test_hashed_reads_a_mapped_tensor_left_unhashed_gives_no_digest(shard: Path) -> None:
    """A mapped tensor's bytes enter the digest only through hash_mapped: without it, no digest."""
    reads = HashedReads(read_header(shard).tensors)
    reads.get("t1")
    reads.load_into("t2", AlignedBuffer(), direct=True)
    assert reads.finish() == {}
