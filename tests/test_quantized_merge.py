"""A LoRA merged into a bitsandbytes-quantized base: the release against PEFT's merge on the
dequantized base (bitsandbytes' own dequantization), the gate, and the bad bases refused by the CLI."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
pytest.importorskip("bitsandbytes")

from click.testing import CliRunner  # noqa: E402
from quantized_builders import (  # noqa: E402
    bnb_dequantized,
    damaged,
    short_absmax,
    truncated_state,
    unknown_quant_type,
)

from mergekit_lite.cli import main  # noqa: E402
from mergekit_lite.pipeline import run_merge, verify_release  # noqa: E402

from helpers import DTYPES, attach_adapters, load_output, merged_state_dict, violations, write_manifest  # noqa: E402

ADAPTER = "llama_lora"  # every Linear of the tiny Llama, the shapes of the quantized zoo's


def peft_on_dequantized(folder, adapter) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload, in float32, on the base as bitsandbytes dequantizes it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in bnb_dequantized(folder).items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model, names = attach_adapters(model.eval(), [(adapter, 1.0)])
        return merged_state_dict(peft_model, names)


@pytest.fixture(scope="session")
def merged(qzoo, zoo, tmp_path_factory):
    """(variant, dtype, base kind) -> the release folder; base kind `quantized` or `dense` (the
    16-bit original the quantized base was made from)."""
    done = {}

    def build(variant: str, dtype: str, kind: str = "quantized"):
        key = (variant, dtype, kind)
        if key not in done:
            base = qzoo.quantized(variant) if kind == "quantized" else qzoo.dense()
            folder = tmp_path_factory.mktemp(f"{variant}-{dtype}-{kind}")
            # the end-to-end check runs on one release (nf4, double quant), to keep the tests quick
            verify = None if (variant, kind) == ("nf4-dq", "quantized") else {"logits": False}
            done[key] = run_merge(write_manifest(folder, base, [(zoo.adapter(ADAPTER), None)], dtype, verify=verify))
        return done[key]

    return build


@pytest.mark.parametrize(
    ("variant", "dtype"), [("nf4-dq", "bfloat16"), ("fp4", "float32"), ("int8", "bfloat16"), ("fp8-8x32", "bfloat16")]
)
def test_release_matches_peft_on_dequantized_base(qzoo, zoo, merged, variant, dtype):
    folder = qzoo.quantized(variant)
    release = load_output(merged(variant, dtype))
    ref = peft_on_dequantized(folder, zoo.adapter(ADAPTER))
    base = {k: v.float() for k, v in bnb_dequantized(folder).items()}
    assert sorted(release) == sorted(ref)
    assert all(release[k].dtype == DTYPES[dtype] for k in release)
    assert not violations(release, ref, base, DTYPES[dtype])
    config = json.loads((merged(variant, dtype) / "config.json").read_text())
    assert "quantization_config" not in config


def test_control_release_of_the_16bit_base_differs(qzoo, zoo, merged):
    """Negative control: merged into the 16-bit original instead, the release is not PEFT's merge on
    the dequantized base (the comparison above can tell which base the adapter went into)."""
    release = load_output(merged("nf4-dq", "bfloat16", "dense"))
    folder = qzoo.quantized("nf4-dq")
    ref = peft_on_dequantized(folder, zoo.adapter(ADAPTER))
    base = {k: v.float() for k, v in bnb_dequantized(folder).items()}
    found = {v.name for v in violations(release, ref, base, torch.bfloat16)}
    assert len(found) >= 14, found  # every quantized Linear


def test_gate_passes_and_says_what_was_merged_into(merged):
    out = merged("nf4-dq", "bfloat16")
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] is True
    assert report["context"]["reference_base"].startswith("dequantized by bitsandbytes")
    assert "stored as bitsandbytes nf4 (double quant)" in (out / "README.md").read_text()


def test_control_gate_fails_a_release_merged_into_the_16bit_base(qzoo, zoo, merged, tmp_path):
    """Negative control: the dense-base release checked against the quantized base's manifest fails."""
    release = merged("nf4-dq", "bfloat16", "dense")
    against = tmp_path / "candidate"
    shutil.copytree(release, against)
    manifest = write_manifest(tmp_path, qzoo.quantized("nf4-dq"), [(zoo.adapter(ADAPTER), None)], "bfloat16")
    report = verify_release(manifest, against)
    assert not report.passed
    failed = {c["group"] for c in report.to_dict()["checks"] if not c["passed"]}
    assert failed == {"algebra"}  # the per-tensor check against the dequantized base


def _gptq(folder):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))


BAD_BASES = {  # damage, variant, what the one line says
    "truncated quant_state": (truncated_state, None, "not a complete bitsandbytes quant_state"),
    "absmax length": (short_absmax, None, "dequantizing its weight needs F32 [16]"),
    "unknown quant_type": (unknown_quant_type, None, "has quant_type 'nf3'"),
    "GPTQ base": (None, _gptq, "quantized with `gptq`"),
}


@pytest.mark.parametrize("bad", sorted(BAD_BASES))
def test_bad_quantized_base_one_line_exit_2(qzoo, zoo, tmp_path, bad):
    tensors_change, config_change, needle = BAD_BASES[bad]
    base = damaged(qzoo.quantized("nf4" if bad == "absmax length" else "nf4-dq"), tmp_path / "base", tensors_change)
    if config_change is not None:
        config_change(base)
    manifest = write_manifest(tmp_path, base, [(zoo.adapter(ADAPTER), None)], "bfloat16")
    result = CliRunner().invoke(main, ["merge", str(manifest)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_control_undamaged_quantized_base_merges_from_the_cli(qzoo, zoo, tmp_path):
    """Negative control for the refusals: the same copy, undamaged, merges and publishes."""
    base = damaged(qzoo.quantized("nf4-dq"), tmp_path / "base", lambda tensors: None)
    manifest = write_manifest(tmp_path, base, [(zoo.adapter(ADAPTER), None)], "bfloat16", verify={"logits": False})
    result = CliRunner().invoke(main, ["merge", str(manifest)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_mxfp4_release_matches_peft_on_dequantized_base(qzoo, tmp_path):
    """gpt-oss's MXFP4 experts dequantized (written bf16), a LoRA on its attention merged, against PEFT
    on transformers' Mxfp4Config(dequantize=True) load; negative control: the dense original's release."""
    folder = qzoo.quantized("mxfp4")
    adapter = qzoo.adapter(qzoo.gpt_oss(), ["q_proj", "v_proj", "o_proj"])
    ref = peft_on_dequantized(folder, adapter)
    base = {k: v.float() for k, v in bnb_dequantized(folder).items()}
    out = run_merge(write_manifest(tmp_path, folder, [(adapter, None)], "bfloat16", verify={"logits": False}))
    release = load_output(out)
    assert sorted(release) == sorted(ref) and not violations(release, ref, base, torch.bfloat16)
    dense = run_merge(
        write_manifest(tmp_path, qzoo.gpt_oss(), [(adapter, None)], "bfloat16", "dense", verify={"logits": False})
    )
    found = {v.name for v in violations(load_output(dense), ref, base, torch.bfloat16)}
    assert {n for n in found if "experts" in n} == {
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    }


def _qlora_manifest(folder, base, adapter, quant_type="nf4", **sections):
    """A manifest whose base is `{path: base, dequantize: quant_type}`."""
    import yaml

    path = write_manifest(folder, base, [(adapter, None)], "bfloat16", **sections)
    doc = yaml.safe_load(path.read_text())
    doc["base"] = {"path": doc["base"], "dequantize": quant_type}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_qlora_choice_is_the_prequantized_base_bit_for_bit(qzoo, zoo, merged, tmp_path):
    """`dequantize: nf4` on the 16-bit base merges into exactly the weights of the nf4 (double quant)
    checkpoint transformers + bitsandbytes save from it; negative control: the 16-bit merge is not."""
    out = run_merge(_qlora_manifest(tmp_path, qzoo.dense(), zoo.adapter(ADAPTER), verify={"logits": False}))
    release, prequantized = load_output(out), load_output(merged("nf4-dq", "bfloat16"))
    assert sorted(release) == sorted(prequantized)
    assert all(torch.equal(release[k].view(torch.int16), prequantized[k].view(torch.int16)) for k in release)
    dense = load_output(merged("nf4-dq", "bfloat16", "dense"))
    assert sum(not torch.equal(release[k], dense[k]) for k in release) >= 14
    assert "quantized here as QLoRA does: bitsandbytes nf4 (double quant)" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("base", "quant_type", "needle"),
    [
        ("nf4-dq", "nf4", "stored quantized already"),
        ("dense", "nf5", "dequantize"),
    ],
)
def test_qlora_choice_refusals(qzoo, zoo, tmp_path, base, quant_type, needle):
    folder = qzoo.dense() if base == "dense" else qzoo.quantized(base)
    manifest = _qlora_manifest(tmp_path, folder, zoo.adapter(ADAPTER), quant_type)
    result = CliRunner().invoke(main, ["merge", str(manifest)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_plan_counts_dequantized_sizes(qzoo, zoo, merged, tmp_path):
    """The plan's output size (checked against free disk) and memory are those of the dequantized
    weights: as for the 16-bit original, and as written; negative control: the packed 4-bit weights
    are smaller, so counting them would show."""
    from mergekit_lite.pipeline import prepare
    from mergekit_lite.sources.checkpoint import read_checkpoint

    adapter = [(zoo.adapter(ADAPTER), None)]
    quantized = prepare(write_manifest(tmp_path / "q", qzoo.quantized("nf4-dq"), adapter, "bfloat16"), False).plan
    dense = prepare(write_manifest(tmp_path / "d", qzoo.dense(), adapter, "bfloat16"), False).plan
    written = sum(p.stat().st_size for p in merged("nf4-dq", "bfloat16").glob("*.safetensors"))
    assert quantized.total_bytes == dense.total_bytes and 0 < written - quantized.total_bytes < 4096  # the header
    assert quantized.peak_bytes > dense.peak_bytes  # and the stored parts, dequantized one tensor at a time
    packed = read_checkpoint(qzoo.quantized("nf4-dq")).tensors.values()
    as_stored = sum(e.quant.part("weight").nbytes if e.quant else e.nbytes for e in packed)
    assert as_stored < 0.8 * quantized.total_bytes


def test_reference_base_without_bitsandbytes_is_the_same(qzoo, monkeypatch):
    """Where bitsandbytes is missing, the gate's reference base comes from mergekit-lite's own
    dequantizer: the same values as bitsandbytes'; control: the 16-bit original's are not."""
    from mergekit_lite.gate import dequantized
    from mergekit_lite.sources.checkpoint import read_checkpoint

    folder = qzoo.quantized("nf4-dq")
    monkeypatch.setattr(dequantized, "dequantizer", lambda base: dequantized.BY_MERGEKIT)
    model, by = dequantized.dequantized_base(folder, read_checkpoint(folder).tensors, torch.float32, {})
    assert by == dequantized.BY_MERGEKIT
    got, want = model.state_dict(), bnb_dequantized(folder)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k].float()) for k in want)
    dense = load_output(qzoo.dense())
    assert sum(not torch.equal(got[k], dense[k].float()) for k in dense) >= 14
