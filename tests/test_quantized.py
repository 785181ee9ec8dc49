"""Quantized bases: mergekit-lite's dequantizer (no bitsandbytes at run time) against bitsandbytes
itself, bit for bit, and the bad checkpoints it refuses before anything is written."""

from __future__ import annotations

import json
import logging

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from quantized_builders import (  # noqa: E402
    VARIANTS,
    WEIGHT,
    bnb_dequantized,
    damaged,
    fp8_wrong_grid,
    no_quant_state,
    other_table,
    short_absmax,
    short_scb,
    truncated_state,
    unknown_quant_type,
)

from mergekit_lite.errors import CheckpointError  # noqa: E402
from mergekit_lite.io.dequant import code_table, dequantize_4bit, nested_absmax  # noqa: E402
from mergekit_lite.io.reader import TensorReader  # noqa: E402
from mergekit_lite.sources.checkpoint import read_checkpoint  # noqa: E402

LINEARS = 2 * 7  # quantized Linear weights of the tiny Llama (lm_head stays dense)
EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"  # an MXFP4 tensor of the tiny gpt-oss


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns, so that -0.0 and 0.0 (and NaN payloads) compare as stored."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def ours(folder) -> dict[str, torch.Tensor]:
    ckpt = read_checkpoint(folder)
    reader = TensorReader(ckpt.tensors)
    return {name: reader.get(name) for name in ckpt.tensors}


@pytest.mark.parametrize("name", [*sorted(VARIANTS), "mxfp4"])
def test_checkpoint_dequantized_as_its_quantizer_does(qzoo, name):
    folder = qzoo.quantized(name)
    ckpt = read_checkpoint(folder)
    assert sum(e.quant is not None for e in ckpt.tensors.values()) == (4 if name == "mxfp4" else LINEARS)
    assert ckpt.quantization.startswith("stored as " + {"fp8": "FP8", "mxf": "MXFP4"}.get(name[:3], "bitsandbytes"))
    got, want = ours(folder), bnb_dequantized(folder)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(bits(got[key]), bits(value)), key
    loaded = TensorReader(ckpt.tensors)  # every read path gives the same values
    assert torch.equal(bits(loaded.load(WEIGHT)), bits(want[WEIGHT]))


@pytest.mark.parametrize("name", ["nf4-dq", "int8", "fp8-16", "mxfp4"])
def test_control_damaged_weight_is_seen(qzoo, tmp_path, name):
    """Negative control: one changed byte of one packed weight shows up in that tensor only."""
    weight = EXPERTS if name == "mxfp4" else WEIGHT

    def flip(tensors):
        tensors[weight + ("_blocks" if name == "mxfp4" else "")].view(torch.uint8).view(-1)[3] ^= 0x11

    folder = damaged(qzoo.quantized(name), tmp_path / "flipped", flip)
    got, want = ours(folder), bnb_dequantized(qzoo.quantized(name))
    differ = [k for k in want if not torch.equal(bits(got[k]), bits(want[k]))]
    assert differ == [weight]


def _quantized(shape, dtype, quant_type, blocksize, nested):
    torch.manual_seed(7)
    w = (torch.randn(shape) * 0.05).to(dtype)
    return bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def _absmax(state, nested):
    if not nested:
        return state.absmax
    s2 = state.state2
    return nested_absmax(state.absmax, s2.absmax, s2.code, s2.blocksize, float(state.offset))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(
    ("dtype", "shape"), [(torch.bfloat16, (48, 80)), (torch.float16, (33, 35)), (torch.float32, (5, 3000))]
)
def test_dequantize_4bit_bit_for_bit(quant_type, blocksize, nested, dtype, shape):
    packed, state = _quantized(shape, dtype, quant_type, blocksize, nested)
    want = bnb_functional.dequantize_4bit(packed, state)
    got = dequantize_4bit(packed, _absmax(state, nested), quant_type, blocksize, shape, dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    if quant_type == "fp4" and shape[-1] % 2:
        # bitsandbytes' CPU kernel hands an odd last dimension to its pure-torch fallback, whose
        # table has +0.0 for fp4's code 8 where its C and CUDA kernels (and we) give -0.0
        differ = bits(got) != bits(want)
        assert torch.equal(got, want) and bool((got[differ] == 0).all())
    else:
        assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("wrong", ["blocksize", "quant_type", "nested offset"])
def test_control_dequantize_4bit_wrong_parameter_differs(wrong):
    """Negative control: the bit-for-bit test sees a wrong block size, code table or offset."""
    shape, dtype = (48, 80), torch.bfloat16
    packed, state = _quantized(shape, dtype, "nf4", 64, True)
    want = bnb_functional.dequantize_4bit(packed, state)
    absmax = _absmax(state, True)
    if wrong == "nested offset":
        absmax = absmax + 1e-3
    got = dequantize_4bit(
        packed, absmax, "fp4" if wrong == "quant_type" else "nf4", 128 if wrong == "blocksize" else 64, shape, dtype
    )
    assert not torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_tables_are_bitsandbytes(quant_type):
    want = bnb_functional.get_4bit_type(quant_type, device="cpu")
    assert torch.equal(code_table(quant_type), want)  # by value: fp4's code 8 is -0.0 in the kernels
    assert not torch.equal(bits(code_table("fp4" if quant_type == "nf4" else "nf4")), bits(want))  # control


BAD = {  # damage -> (variant, words the one-line error must contain)
    "truncated quant_state": (truncated_state, "nf4-dq", ["quant_state", "not a complete"]),
    "absmax length": (short_absmax, "nf4", ["absmax", "[16]"]),
    "unknown quant_type": (unknown_quant_type, "nf4-dq", ["quant_type", "'nf3'"]),
    "foreign quant_map": (other_table, "fp4", ["quant_map", "fp4 table"]),
    "missing quant_state": (no_quant_state, "nf4-dq", ["absmax", "no quant_state"]),
    "SCB length": (short_scb, "int8", ["SCB", "[32]"]),
    "FP8 scale grid": (fp8_wrong_grid, "fp8-16", ["weight_scale_inv", "16x16 blocks needs F32 [2, 2]"]),
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_quant_state_refused(qzoo, tmp_path, bad):
    change, variant, words = BAD[bad]
    folder = damaged(qzoo.quantized(variant), tmp_path / "bad", change)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(folder)
    message = str(info.value)
    assert "\n" not in message and WEIGHT.rsplit(".", 1)[0] in message
    assert all(w in message for w in words), message


@pytest.mark.parametrize("variant", ["nf4-dq", "fp4", "int8", "fp8-16"])
def test_control_undamaged_copy_reads(qzoo, tmp_path, variant):
    """Negative control for the refusals: the same copy, unchanged, is read."""
    folder = damaged(qzoo.quantized(variant), tmp_path / "same", lambda tensors: None)
    assert read_checkpoint(folder).quantization


@pytest.mark.parametrize("method", ["gptq", "awq", "hqq", "compressed-tensors", "something-new"])
def test_other_quantization_methods_refused(qzoo, tmp_path, method):
    folder = damaged(qzoo.dense(), tmp_path / method, lambda tensors: None)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"quantized with `{method}`.*dequantize it to a 16-bit checkpoint"):
        read_checkpoint(folder)


def test_gguf_only_folder_refused(qzoo, tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="GGUF"):
        read_checkpoint(folder)
