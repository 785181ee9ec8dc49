"""The shard writer's fast paths (direct I/O, kernel copies) against its plain ones, byte for byte,
and the write-behind thread's error handling."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mergekit_lite.io.reader as reader_module
import mergekit_lite.io.writer as writer_module
from mergekit_lite.errors import MergeError
from mergekit_lite.io.format import NAMES, encode_header, read_header
from mergekit_lite.io.writer import ShardWriter
from mergekit_lite.merge.merge import WriteBehind

# odd sizes, so that tensors straddle the staging buffer and disk blocks; one larger than the buffer
SHAPES = [(3,), (1000, 7), (5,), (4099,), (64, 65), (1,)]
SMALL_STAGING = 8192


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, shape in enumerate(SHAPES):
        dtype = [torch.float32, torch.bfloat16, torch.float16][i % 3]
        out[f"t{i}"] = torch.randn(shape, generator=gen).to(dtype)
    return out


def _expected(tensors: dict[str, torch.Tensor]) -> bytes:
    entries = [(name, NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]
    return encode_header(entries, {"format": "pt"}) + b"".join(
        t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors.values()
    )


@pytest.fixture(params=["direct", "buffered"])
def mode(request, monkeypatch) -> str:
    """Run a test with direct I/O and without it (a filesystem that refuses O_DIRECT), with a small
    staging buffer so that every path through it is taken."""
    monkeypatch.setattr(writer_module, "STAGING", SMALL_STAGING)
    if request.param == "buffered":
        monkeypatch.setattr(reader_module, "DIRECT", 0)
    return request.param


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "source.safetensors"
    save_file(_tensors(seed=1), path, metadata={"format": "pt"})
    return path


def _write(path: Path, tensors: dict[str, torch.Tensor], source: Path | None = None) -> bool:
    """Write `tensors` (copying t1 and t3 from `source` when given); return whether direct I/O was on."""
    entries = [(name, NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]
    located = read_header(source).tensors if source else {}
    with ShardWriter(path, entries, {"format": "pt"}) as writer:
        direct = writer.direct
        for name, t in tensors.items():
            if name in located and name in ("t1", "t3"):
                e = located[name]
                writer.copy_range(name, e.file, e.begin, e.nbytes)
            else:
                writer.write_tensor(name, t)
    return direct


def test_tensors_are_written_byte_for_byte(tmp_path: Path, mode: str) -> None:
    tensors = _tensors()
    direct = _write(tmp_path / "out.safetensors", tensors)
    if mode == "direct" and not direct:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert direct == (mode == "direct")
    assert (tmp_path / "out.safetensors").read_bytes() == _expected(tensors)
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def test_copies_equal_their_source_bytes(tmp_path: Path, mode: str, source: Path) -> None:
    copied = _tensors(seed=1)  # what the source holds
    mixed = {k: (copied[k] if k in ("t1", "t3") else v) for k, v in _tensors().items()}
    _write(tmp_path / "out.safetensors", mixed, source)
    assert (tmp_path / "out.safetensors").read_bytes() == _expected(mixed)
    control = dict(mixed, t1=_tensors()["t1"])  # negative control: the other t1
    assert (tmp_path / "out.safetensors").read_bytes() != _expected(control)


@pytest.mark.parametrize("error", [errno.EXDEV, errno.ENOSYS, errno.EINVAL])
def test_copy_falls_back_when_the_kernel_cannot(tmp_path: Path, monkeypatch, source: Path, error: int) -> None:
    monkeypatch.setattr(reader_module, "DIRECT", 0)  # kernel copies are used with buffered writes

    def refuse(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    mixed = {k: (_tensors(seed=1)[k] if k in ("t1", "t3") else v) for k, v in _tensors().items()}
    _write(tmp_path / "out.safetensors", mixed, source)
    assert (tmp_path / "out.safetensors").read_bytes() == _expected(mixed)


def test_copy_reports_other_errors(tmp_path: Path, monkeypatch, source: Path) -> None:
    monkeypatch.setattr(reader_module, "DIRECT", 0)

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    with pytest.raises(OSError, match="Input/output"):
        _write(tmp_path / "out.safetensors", _tensors(), source)


def test_direct_io_refused_at_write_time_falls_back(tmp_path: Path, monkeypatch) -> None:
    """A filesystem that accepts O_DIRECT when set but fails the writes with EINVAL."""
    if not reader_module.DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    monkeypatch.setattr(writer_module, "STAGING", SMALL_STAGING)
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & reader_module.DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    tensors = _tensors()
    _write(tmp_path / "out.safetensors", tensors)
    assert refused == [0]  # the first direct write, then none
    assert (tmp_path / "out.safetensors").read_bytes() == _expected(tensors)


def test_a_short_source_is_an_error(tmp_path: Path, mode: str, source: Path) -> None:
    tensors = _tensors()
    entries = [(name, NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]
    e = read_header(source).tensors["t0"]
    writer = ShardWriter(tmp_path / "out.safetensors", entries, {})
    with pytest.raises(OSError, match="ended early"):
        writer.copy_range("t0", source, source.stat().st_size - 4, e.nbytes)
    writer.abort()


def test_a_shard_closed_early_is_refused(tmp_path: Path, mode: str) -> None:
    tensors = _tensors()
    entries = [(name, NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]
    writer = ShardWriter(tmp_path / "out.safetensors", entries, {})
    writer.write_tensor("t0", tensors["t0"])
    with pytest.raises(MergeError, match="closed before `t1`"):
        writer.close()
    writer.abort()
    writer.abort()  # twice is fine


def test_write_behind_raises_a_worker_error_at_the_next_submit() -> None:
    ran = []

    def fail() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        with WriteBehind() as behind:
            behind.submit(fail)
            for i in range(WriteBehind.DEPTH + 1):
                behind.submit(ran.append, i)
    assert len(ran) < WriteBehind.DEPTH + 1


def test_write_behind_raises_a_worker_error_at_the_end() -> None:
    with pytest.raises(OSError, match="No space"):
        with WriteBehind() as behind:
            behind.submit(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))


def test_write_behind_stops_writing_when_the_caller_fails() -> None:
    """The queued job is cancelled, the running one finishes before the block is left."""
    started, release, done = threading.Event(), threading.Event(), []

    def slow() -> None:
        started.set()
        release.wait(5)
        done.append("running")

    with pytest.raises(RuntimeError, match="caller"):
        with WriteBehind() as behind:
            behind.submit(slow)
            behind.submit(done.append, "queued")
            started.wait(5)
            threading.Timer(0.2, release.set).start()  # after the block has begun to unwind
            raise RuntimeError("caller failed")
    assert done == ["running"]
    assert not [t for t in threading.enumerate() if t.name.startswith("mergekit-writer")]


def test_the_digest_is_the_files_sha256(tmp_path: Path, mode: str, source: Path) -> None:
    import hashlib

    mixed = {k: (_tensors(seed=1)[k] if k in ("t1", "t3") else v) for k, v in _tensors().items()}
    entries = [(name, NAMES[t.dtype], tuple(t.shape)) for name, t in mixed.items()]
    located = read_header(source).tensors
    with ShardWriter(tmp_path / "out.safetensors", entries, {"format": "pt"}, digest=True) as writer:
        for name, t in mixed.items():
            if name in ("t1", "t3"):
                writer.copy_range(name, source, located[name].begin, located[name].nbytes)
            else:
                writer.write_tensor(name, t)
    data = (tmp_path / "out.safetensors").read_bytes()
    assert data == _expected(mixed)
    assert writer.sha256 is not None and writer.sha256.hexdigest() == hashlib.sha256(data).hexdigest()
