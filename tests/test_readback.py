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
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergekit_lite.gate.algebra as algebra_module
import mergekit_lite.gate.inflight as inflight_module
import mergekit_lite.gate.integrity as integrity_module
import mergekit_lite.io.digests as digests_module
import mergekit_lite.merge.merge as merge_module
from mergekit_lite import run_merge
from mergekit_lite.errors import MergeError
from mergekit_lite.io import writer as writer_module
from mergekit_lite.io.format import TensorEntry, layout, read_header
from mergekit_lite.io.readback import HashedReads
from mergekit_lite.io.reader import AlignedBuffer
from mergekit_lite.io.writer import Abandoned, Written
from mergekit_lite.pipeline import GateFailed, verify_release
from mergekit_lite.plan.plan import SHARD_METADATA

from release_builders import build_adapter, build_chat_base, build_tokenizer, copy_release, write_manifest

CHANGED = "mlp.up_proj.weight"  # a tensor the all-linear adapter changes, in every layer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(folder, base, adapter): a tiny bf16 Llama and an all-linear LoRA."""
    root = tmp_path_factory.mktemp("readback")
    base = build_chat_base(root / "base", build_tokenizer())
    adapter = build_adapter(base, root / "adapter", seed=3, r=4, lora_alpha=8, target_modules="all-linear")
    return root, base, adapter


def manifest_for(inputs, name: str, in_flight: bool = True) -> Path:
    """A manifest of its own (output `name`), the output in several shards, the gate without logits
    (and with its per-tensor checks in flight, or after the merge)."""
    root, base, adapter = inputs
    return write_manifest(
        root,
        base,
        [adapter],
        "bfloat16",
        out_name=name,
        max_shard_size="10KB",
        name=f"{name}.yaml",
        verify={"logits": False, "in_flight": in_flight},
    )


def flip(path: Path, name: str, bit: int, element: int = 5, entry: TensorEntry | None = None) -> None:
    """Flip one bit of one bfloat16 element of tensor `name` in the file (at `entry`, else as its header says)."""
    entry = entry or read_header(path).tensors[name]
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

    def spy_init(self, path, entries, metadata, digest=False, **kwargs):  # noqa: ANN001
        writers.append(digest)
        init(self, path, entries, metadata, digest, **kwargs)

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
    write and the read-back fails it and nothing is published; untouched, the same merge passes.
    (After the merge: in flight a tensor may be read before its shard is closed; see below.)"""
    name = f"flip-{bit}"
    manifest = manifest_for(inputs, name, in_flight=False)
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
    merge(manifest_for(inputs, out.name, in_flight=False), verify=verify)
    assert hit
    recorded = {o["path"]: o["sha256"] for o in json.loads((out / "release.json").read_text())["outputs"]}
    for shard in shards_of(out):
        if shard.name not in hit:
            assert sums(out)[shard.name] == on_disk(shard)
            continue
        assert (sums(out)[shard.name] == on_disk(shard)) is matches
        assert (recorded[shard.name] == on_disk(shard)) is matches


# --------------------------------------------------------------------------- in flight


def flip_as_written(monkeypatch, bit: int) -> set[str]:
    """Each changed tensor gets `bit` flipped in its shard file right after the write that carries its
    last byte returns, before that write is reported to the checks in flight (so they can only read
    the flipped bytes); returns the names of the tensors flipped."""
    report = writer_module.ShardWriter._report
    hit: set[str] = set()

    def flip_then_report(self) -> None:
        for name, entry in layout(self.path, self.entries, SHARD_METADATA).items():
            if name.endswith(CHANGED) and name not in hit and entry.begin + entry.nbytes <= self.offset:
                flip(self.path, name, bit, entry=entry)
                hit.add(name)
        report(self)

    monkeypatch.setattr(writer_module.ShardWriter, "_report", flip_then_report)
    return hit


def rows(report: dict) -> list[tuple]:
    return [(c["id"], c["passed"], c["figure"]) for c in report["checks"]]


def test_in_flight_the_checks_and_the_release_are_those_of_the_checks_after_the_merge(inputs) -> None:
    """The per-tensor checks run while the merge writes: the same rows, figures and release bytes (and
    SHA256SUMS) as when they run on the finished shards; the report says which ran."""
    flying, after = merge(manifest_for(inputs, "in-flight")), merge(manifest_for(inputs, "after", in_flight=False))
    reports = [json.loads((out / "verification.json").read_text()) for out in (flying, after)]
    assert reports[0]["context"].get("algebra_in_flight") is True
    assert "algebra_in_flight" not in reports[1]["context"]  # control: the flag tells the two apart
    assert rows(reports[0]) == rows(reports[1])
    assert any(c["id"].startswith("algebra.") for c in reports[0]["checks"])
    shards = [s.name for s in shards_of(after)]
    assert len(shards) >= 2 and [s.name for s in shards_of(flying)] == shards
    assert [sums(flying)[s] for s in shards] == [sums(after)[s] for s in shards] == [on_disk(after / s) for s in shards]


@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
@pytest.mark.parametrize(("bit", "fails"), [(14, True), (0, False)], ids=["exponent-bit", "control-one-ulp"])
def test_in_flight_a_byte_changed_as_it_is_written_is_seen(
    inputs, monkeypatch, bit: int, fails: bool, mapped: bool
) -> None:
    """In flight the checks read the file, not the merge's memory: an exponent bit flipped on disk as
    the tensor is written fails the gate (nothing published); one ulp flipped passes the elementwise
    bound and is in the recorded digests, which match the disk. `mapped`: every tensor mapped rather
    than read into a buffer, as the largest are (the mapping serves a file still being written)."""
    name = f"flown-flip-{bit}-{mapped}"
    manifest = manifest_for(inputs, name)
    hit = flip_as_written(monkeypatch, bit)
    if mapped:  # and each shard in several writes, slowly, so that tensors are mapped from unfinished files
        monkeypatch.setattr(algebra_module, "READ_AHEAD", 0)
        monkeypatch.setattr(writer_module, "STAGING", 8192)
        report = writer_module.ShardWriter._report

        def report_slowly(self) -> None:
            report(self)
            time.sleep(0.02)

        monkeypatch.setattr(writer_module.ShardWriter, "_report", report_slowly)
    if fails:
        with pytest.raises(GateFailed) as info:
            merge(manifest)
        assert hit and info.value.report.context.get("algebra_in_flight") is True
        assert "algebra" in {c.group for c in info.value.report.failures}
        assert not (inputs[0] / name).exists()
        return
    out = merge(manifest)
    assert hit and json.loads((out / "verification.json").read_text())["context"]["algebra_in_flight"]
    for shard in shards_of(out):
        assert sums(out)[shard.name] == on_disk(shard)


def test_in_flight_a_failed_merge_stops_the_checks(inputs, monkeypatch) -> None:
    """The merge fails half-way: its error comes out, nothing is published and the checks' thread,
    waiting for bytes that will never be written, has stopped."""
    calls = {"n": 0}
    merge_tensor = merge_module.merge_tensor

    def fail_late(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 6:
            raise MergeError("injected failure")
        return merge_tensor(*args, **kwargs)

    monkeypatch.setattr(merge_module, "merge_tensor", fail_late)
    with pytest.raises(MergeError, match="injected failure"):
        merge(manifest_for(inputs, "flown-failed"))
    assert not (inputs[0] / "flown-failed").exists()
    assert not [t for t in threading.enumerate() if t.name == "mergekit-gate-in-flight"]


def test_in_flight_shards_not_as_planned_are_checked_again(inputs, monkeypatch) -> None:
    """Where the headers written are not the predicted ones (here: a prediction made wrong on purpose),
    the rows from flight are dropped and the algebra runs on the finished shards: the same verdict."""
    real = inflight_module.predicted

    def off_by_one(plan, folder):  # noqa: ANN001
        table = real(plan, folder)
        name = next(iter(table))
        table[name] = replace(table[name], begin=table[name].begin + 2)
        return table

    monkeypatch.setattr(inflight_module, "predicted", off_by_one)
    out = merge(manifest_for(inputs, "flown-unplanned"))
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] and "algebra_in_flight" not in report["context"]
    assert any(c["id"].startswith("algebra.") for c in report["checks"])


def test_written_waits_for_the_bytes_and_gives_up_when_the_merge_stops(tmp_path: Path) -> None:
    written, path = Written(), tmp_path / "a"
    done: list[str] = []

    def reader() -> None:
        try:
            written.wait(path, 100)
            done.append("bytes")
            written.wait(path, None)
            done.append("closed")
            written.wait(tmp_path / "never", 1)
        except Abandoned:
            done.append("abandoned")

    thread = threading.Thread(target=reader)
    thread.start()
    written.advance(path, 99)
    thread.join(0.2)
    assert done == []  # one byte short: still waiting
    written.advance(path, 100)
    written.close(path)
    thread.join(0.2)
    assert done == ["bytes", "closed"]
    written.stop()
    thread.join(5)
    assert done == ["bytes", "closed", "abandoned"] and not thread.is_alive()


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
