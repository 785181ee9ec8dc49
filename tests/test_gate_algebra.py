"""The algebra check's machinery: ulps from exponent bits, the row passes on several threads, and
the read-ahead that brings the candidate back from disk while the CPU checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_lite.gate import algebra
from mergekit_lite.gate import rows as row_passes
from mergekit_lite.gate.rows import RowPasses
from mergekit_lite.gate.rows import matmul as _matmul
from mergekit_lite.gate.rows import matmul_and_ulp_scale as _matmul_and_ulp_scale
from mergekit_lite.io.format import read_header
from mergekit_lite.io.readback import HashedReads
from mergekit_lite.io.reader import ALIGN, AlignedBuffer, TensorReader
from mergekit_lite.plan.plan import PlannedTensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ulp_from_exponent_bits_equals_frexp_definition(dtype: torch.dtype) -> None:
    """The algebra check's ulp (exponent bits) against the textbook one (frexp), over normals,
    subnormals, zeros, powers of two and both signs."""
    from mergekit_lite.gate.rows import MANTISSA as _MANTISSA
    from mergekit_lite.gate.rows import ULP_SCALE as _ULP_SCALE
    from mergekit_lite.gate.rows import exponent_squared as _exponent_squared

    def ulp_squared(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _exponent_squared(block, dtype) * _ULP_SCALE[dtype]

    info = torch.finfo(dtype)
    values = torch.cat(
        [
            torch.randn(4096, generator=torch.Generator().manual_seed(0))
            * 10.0 ** torch.randint(-3, 4, (4096,)).float(),
            torch.tensor(
                [0.0, -0.0, 1.0, -1.0, 2.0, 0.5, info.tiny, info.tiny / 4, -info.tiny / 8, info.max, -info.max]
            ),
        ]
    ).to(dtype)
    _, exponent = torch.frexp(values.abs().clamp_min(info.tiny).to(torch.float64))
    textbook = torch.pow(2.0, 2.0 * (exponent.to(torch.float64) - _MANTISSA[dtype]))
    for work in (torch.float32, torch.float64) if dtype != torch.float32 else (torch.float64,):
        ours = ulp_squared(values.to(work), dtype).to(torch.float64)
        # squares below float32's range (bfloat16 values under 2^-63) underflow to 0; a row of only
        # such values is redone in float64 (test_algebra_redoes_underflowing_rows_in_float64)
        representable = (textbook >= torch.finfo(work).smallest_normal * 2.0**-23) & (textbook <= torch.finfo(work).max)
        assert torch.equal(ours[representable], textbook[representable]), work
        assert ((ours[~representable] == 0) | ours[~representable].isinf()).all()
        assert not torch.equal(ulp_squared((values * 2).to(work), dtype).to(torch.float64), textbook)  # control


def test_algebra_redoes_underflowing_rows_in_float64() -> None:
    from mergekit_lite.gate.rows import matmul_and_ulp_scale as _matmul_and_ulp_scale

    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    w[2] = (w[2].float() * 1e-25).to(torch.bfloat16)  # squares of its ulps underflow float32
    w[4, 7] = 1e30  # and this one's overflows
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    product, spread = _matmul_and_ulp_scale(w, x, False)
    product64, spread64 = _matmul_and_ulp_scale(w, x, False, torch.float64)
    assert (spread > 0).all()
    assert torch.equal(spread, spread64) and torch.equal(product, product64)
    assert torch.isfinite(spread).all()
    product32, _ = _matmul_and_ulp_scale(w[[0, 1, 3]], x, False)  # control: normal rows stay in float32
    assert not torch.equal(product32, product64[[0, 1, 3]])


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_row_passes_in_float64_where_float32_products_are_reduced(precision: str) -> None:
    """TF32 (`high`) or bfloat16 passes (`medium`) allowed by the process: the 16-bit weights' row passes
    run in float64, as float32 weights' do. The control: at `highest`, float32."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert row_passes.work_dtype(w) == torch.float32 and row_passes.float32_exact()
    assert row_passes.work_dtype(w.float()) == torch.float64
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        assert not row_passes.float32_exact()
        assert row_passes.work_dtype(w) == torch.float64
    finally:
        torch.set_float32_matmul_precision(before)
    assert row_passes.work_dtype(w) == torch.float32


# --------------------------------------------------------------------------- row passes on threads


def _weights(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_passes_on_threads_give_one_threads_figures(dtype: torch.dtype, monkeypatch) -> None:
    """Blocks shared among threads: W x and its ulp spread bitwise those of one thread, and right
    against a float64 computation from the textbook ulp."""
    monkeypatch.setattr(row_passes, "BLOCK_ELEMENTS", 3 * 70)  # 3 rows a block: many blocks, uneven parts
    w = _weights(301, 70, dtype)
    x = torch.randn(70, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    serial = _matmul_and_ulp_scale(w, x, False)
    for threads in (2, 3, 8):
        with RowPasses(threads) as rows:
            product, spread = _matmul_and_ulp_scale(w, x, False, rows=rows)
            assert torch.equal(product, serial[0]) and torch.equal(spread, serial[1]), threads
            assert torch.equal(_matmul(w, x, False, rows), serial[0])
    exact = w.double() @ x
    _, exponent = torch.frexp(w.double().abs().clamp_min(torch.finfo(dtype).tiny))
    ulp2 = torch.pow(2.0, 2.0 * (exponent.double() - row_passes.MANTISSA[dtype]))
    assert torch.allclose(serial[0], exact, rtol=1e-5, atol=1e-7)
    assert torch.allclose(serial[1], (ulp2 @ (x * x)).sqrt(), rtol=1e-5)
    other = w.clone()
    other[150, 3] = other[150, 3] * 2 + 1  # control: one changed weight changes its row's figures
    with RowPasses(2) as rows:
        changed, _ = _matmul_and_ulp_scale(other, x, False, rows=rows)
    assert not torch.equal(changed[150], serial[0][150]) and torch.equal(changed[:150], serial[0][:150])


def test_row_passes_transposed_sum_the_threads_parts(monkeypatch) -> None:
    """W^T x (GPT-2 DoRA's frame) is summed over rows: each thread's part, then the parts."""
    monkeypatch.setattr(row_passes, "BLOCK_ELEMENTS", 4 * 50)
    w = _weights(97, 50, torch.bfloat16, seed=2)
    x = torch.randn(97, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with RowPasses(3) as rows:
        product, spread = _matmul_and_ulp_scale(w, x, True, rows=rows)
    serial, serial_spread = _matmul_and_ulp_scale(w, x, True)
    assert torch.allclose(product, w.double().T @ x, rtol=1e-5, atol=1e-7)
    assert torch.allclose(product, serial, rtol=1e-5, atol=1e-6) and torch.allclose(spread, serial_spread, rtol=1e-5)
    assert not torch.allclose(product, w.double().T.flip(0) @ x, rtol=1e-3)  # control: the rows' order matters


def test_row_passes_raise_a_threads_error_after_every_part_stopped() -> None:
    with RowPasses(2) as rows, pytest.raises(RuntimeError):
        rows.run(_weights(64, 8, torch.bfloat16), torch.randn(9, 4, dtype=torch.float64), False, torch.float32, True)


# --------------------------------------------------------------------------- reading the candidate back


def _shard(folder: Path, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, dict[str, torch.Tensor]]:
    """A safetensors file whose tensors start at offsets that are not block-aligned."""
    g = torch.Generator().manual_seed(4)
    tensors = {f"t{i}": torch.randn(rows, 33, generator=g).to(dtype) for i, rows in enumerate((1, 7, 200, 3, 129))}
    tensors["scalar"] = torch.tensor(2.5).to(dtype)
    path = folder / "shard.safetensors"
    save_file(tensors, path)
    return path, tensors


@pytest.mark.parametrize("direct", [True, False])
def test_load_into_reads_each_tensor_as_stored(tmp_path: Path, direct: bool) -> None:
    path, tensors = _shard(tmp_path)
    entries = read_header(path).tensors
    assert any(e.begin % ALIGN for e in entries.values())
    reader = TensorReader(entries)
    buffer = AlignedBuffer()  # one buffer for all: each read replaces the last
    for name, expected in tensors.items():
        got = reader.load_into(name, buffer, direct=direct)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), name
        assert torch.equal(got.view(torch.int16), reader.load(name).view(torch.int16))
    assert buffer.memory.data_ptr() % ALIGN == 0
    first = reader.load_into("t2", buffer, direct=direct)
    kept = first.clone()
    reader.load_into("t4", buffer, direct=direct)
    assert not torch.equal(first, kept)  # control: the buffer is reused, as documented


def test_load_into_falls_back_where_direct_reads_are_refused(tmp_path: Path, monkeypatch) -> None:
    """A filesystem that opens with O_DIRECT but fails the reads with EINVAL, or refuses the open."""
    import errno

    from mergekit_lite.io import reader as reader_module

    if not reader_module.DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    path, tensors = _shard(tmp_path)
    reader = TensorReader(read_header(path).tensors)
    real_preadv, real_open = os.preadv, os.open
    refused: list[str] = []

    def preadv(fd, buffers, offset):
        if reader_module.fcntl.fcntl(fd, reader_module.fcntl.F_GETFL) & reader_module.DIRECT:
            refused.append("read")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    assert torch.equal(reader.load_into("t2", AlignedBuffer(), direct=True), tensors["t2"])
    assert refused == ["read"]

    def open_(path, flags, *args):
        if flags & reader_module.DIRECT:
            refused.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    assert torch.equal(reader.load_into("t3", AlignedBuffer(), direct=True), tensors["t3"])
    assert refused == ["read", "open"]


@pytest.mark.parametrize("read_ahead", [2**30, 1000, 0])
def test_read_ahead_yields_every_tensor_in_order(tmp_path: Path, monkeypatch, read_ahead: int) -> None:
    """Candidate and base tensors pair up in the plan's order, each intact when its turn comes,
    whether the next one is read ahead (it fits READ_AHEAD) or when asked for."""
    monkeypatch.setattr(algebra, "READ_AHEAD", read_ahead)
    (tmp_path / "c").mkdir()
    (tmp_path / "b").mkdir()
    cpath, ctensors = _shard(tmp_path / "c")
    bpath, _ = _shard(tmp_path / "b", torch.float16)
    names = ["t4", "t0", "t2", "scalar", "t1", "t3"]
    planned = [
        PlannedTensor(name=n, source=n, dtype="BF16", src_dtype="F16", shape=tuple(ctensors[n].shape), shard=0, ops=[])
        for n in names
    ]
    candidate, base = HashedReads(read_header(cpath).tensors), TensorReader(read_header(bpath).tensors)
    seen = []
    with algebra.ReadAhead(candidate, base, planned) as ahead:
        for t, (merged, w0) in zip(planned, ahead, strict=True):
            assert torch.equal(merged, ctensors[t.name]), t.name
            assert torch.equal(w0, base.load(t.name)) and w0.dtype == torch.float16
            seen.append(t.name)
    assert seen == names
