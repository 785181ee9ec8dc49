"""Digests computed once: shards hashed as written, inputs cached by file identity, and never stale."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import mergekit_lite.io.digests as digests_module
from mergekit_lite.io.digests import DigestCache, InputDigests, cache_folder, identity, input_records
from mergekit_lite.pipeline import execute, prepare

from helpers import write_manifest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "digest-cache"
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(folder))
    return folder


@pytest.fixture
def inputs(zoo, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of a sharded base and an adapter, free to be modified."""
    base = tmp_path / "base"
    adapter = tmp_path / "adapter"
    shutil.copytree(zoo.base("llama"), base)
    shutil.copytree(zoo.adapter("llama_lora"), adapter)
    return base, adapter


def merge(folder: Path, base: Path, adapter: Path, name: str) -> dict:
    manifest = write_manifest(folder, base, [(adapter, None)], "float32", out_name=name, max_shard_size="100KB")
    text = manifest.read_text() + "verify: {logits: false}\n"
    manifest.write_text(text)
    out = execute(prepare(manifest)).output
    receipt = json.loads((out / "release.json").read_text())
    for record in receipt["inputs"]:  # recorded relative to the manifest's folder
        record["path"] = os.path.normpath(folder / record["path"])
    return receipt


def by_path(receipt: dict) -> dict[str, dict]:
    return {r["path"]: r for r in receipt["inputs"]}


def test_second_run_takes_input_digests_from_the_cache(inputs, cache: Path, tmp_path: Path) -> None:
    base, adapter = inputs
    first = by_path(merge(tmp_path, base, adapter, "one"))
    second = by_path(merge(tmp_path, base, adapter, "two"))
    assert {r["digest"] for r in first.values()} == {"computed"}
    assert {r["digest"] for r in second.values()} == {"cached"}
    assert len(first) > 3
    for path, record in second.items():
        assert record["sha256"] == first[path]["sha256"] == sha256(Path(path)), path
    assert (cache / "digests.json").is_file()


def test_a_file_changed_in_place_is_hashed_again(inputs, cache: Path, tmp_path: Path) -> None:
    """Same size, same mtime (set back with utime): the ctime still tells, and the new bytes are hashed."""
    base, adapter = inputs
    first = by_path(merge(tmp_path, base, adapter, "one"))
    shard = sorted(base.glob("*.safetensors"))[-1]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: still a valid file
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = by_path(merge(tmp_path, base, adapter, "two"))
    record = second[str(shard)]
    assert record["digest"] == "computed"
    assert (
        record["sha256"] == sha256(shard) != first[str(shard)]["sha256"]
    )  # negative control: the old digest is wrong now
    others = {p: r["digest"] for p, r in second.items() if p != str(shard)}
    assert set(others.values()) == {"cached"}


def test_cache_off_hashes_everything_and_writes_nothing(
    inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() is None
    base, adapter = inputs
    for name in ("one", "two"):
        records = by_path(merge(tmp_path, base, adapter, name))
        assert {r["digest"] for r in records.values()} == {"computed"}
    assert not (tmp_path / "xdg").exists()


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"key": 3}', ""])
def test_unreadable_cache_is_ignored(inputs, cache: Path, tmp_path: Path, content: str) -> None:
    cache.mkdir()
    (cache / "digests.json").write_text(content)
    base, adapter = inputs
    records = by_path(merge(tmp_path, base, adapter, "one"))
    assert all(r["sha256"] == sha256(Path(p)) for p, r in records.items())
    assert json.loads((cache / "digests.json").read_text())  # rewritten as a valid cache


def test_cache_entry_for_another_identity_is_not_used(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    store = DigestCache(cache)
    store.put(path, "0" * 64, identity(path))
    assert store.get(path) == "0" * 64  # the lookup itself works (control)
    path.write_bytes(b"abd")
    assert store.get(path) is None
    record = input_records([path], store)[0]
    assert (record["sha256"], record["digest"]) == (hashlib.sha256(b"abd").hexdigest(), "computed")


def test_digest_not_cached_when_the_file_changes_while_hashed(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    store = DigestCache(cache)
    before = identity(path)
    path.write_bytes(b"xyz")
    store.put(path, hashlib.sha256(b"abc").hexdigest(), before)
    assert store.get(path) is None


def _sparse_files(folder: Path, n: int) -> list[Path]:
    paths = [folder / f"big{i}.bin" for i in range(n)]
    for p in paths:
        with open(p, "wb") as fh:
            fh.truncate(256 * 2**20)
    return paths


def test_input_digests_stop_when_closed(tmp_path: Path, cache: Path) -> None:
    digests = InputDigests(_sparse_files(tmp_path, 8))
    digests.close()  # returns once the thread has stopped, long before 2 GiB are hashed
    assert all(f.done() for f in digests._futures)
    assert not (cache / "digests.json").exists()


def test_input_digests_added_later_keep_the_order_given_and_hash_each_file_once(
    tmp_path: Path, cache: Path, monkeypatch
) -> None:
    files = []
    for i, data in enumerate([b"a", b"bb", b"ccc", b"dddd"]):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(data)
    hashed: list[Path] = []
    real = digests_module.sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(digests_module, "sha256_file", counting)
    with InputDigests(files[:2]) as digests:  # a merge starts with the base's weight files
        digests.add([files[1], files[0], files[2], files[3]])  # then every input, those included
        records = digests.result()
    assert [r["path"] for r in records] == [str(f) for f in files]
    assert [r["sha256"] for r in records] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert sorted(hashed) == sorted(files)  # once each (control: the list added names two of them again)


def test_a_merge_that_fails_after_hashing_started_stops_the_hashing(tmp_path: Path, cache: Path, monkeypatch) -> None:
    """prepare(hash_inputs=True) starts hashing the base before the adapters are read; an input
    error after that stops the thread (no hashing goes on behind the error line)."""
    from mergekit_lite import pipeline
    from mergekit_lite.errors import InputError

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    started: list[InputDigests] = []
    real = pipeline.InputDigests

    def spy(paths):
        started.append(real(paths))
        return started[-1]

    def refuse(path, **options):
        raise InputError("no base here")

    monkeypatch.setattr(pipeline, "InputDigests", spy)
    monkeypatch.setattr(pipeline, "weight_files", lambda path: _sparse_files(tmp_path, 8))
    monkeypatch.setattr(pipeline, "read_checkpoint", refuse)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"base: {base}\nadapters: [{tmp_path}]\ndtype: bfloat16\noutput: {tmp_path / 'out'}\n")
    with pytest.raises(InputError):
        pipeline.prepare(manifest, hash_inputs=True)
    assert len(started) == 1 and started[0]._stop.is_set()  # closed: the thread has stopped
    assert all(f.done() for f in started[0]._futures)
    started.clear()
    with pytest.raises(InputError):
        pipeline.prepare(manifest)
    assert started == []  # control: without hash_inputs (a plan, a verify) nothing is hashed
