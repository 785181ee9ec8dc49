"""`dtype: float8_e4m3fn`: a LoRA merged into a fine-grained FP8 base and written back in its FP8 layout.

The oracle for the bytes: PEFT's merge_and_unload (in float64, rounded once to float32) on the base
as transformers dequantizes it, quantized by transformers' own FP8 quantizer (`Fp8Quantize`). The
release must be those bytes, load with transformers as the base does, be as small as the base, and
pass the gate; a release with one block's scale damaged, or quantized without the delta, must not.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner
from fp8_builders import (
    BLOCK,
    QUANTIZATION_CONFIG,
    TARGETS,
    Fp8Zoo,
    dequantized_base,
    own_dequantized,
    transformers_quantize,
)
from safetensors.torch import load_file, save_file

from mergekit_lite.cli import main
from mergekit_lite.gate.dequantized import BY_GATE_FP8, BY_TRANSFORMERS_FP8
from mergekit_lite.gate.dequantized import dequantized_base as gate_dequantized_base
from mergekit_lite.pipeline import run_merge, verify_release

from helpers import attach_adapters, half_ulps, load_output, logits, write_manifest


@pytest.fixture(scope="session")
def fp8zoo(tmp_path_factory):
    return Fp8Zoo(tmp_path_factory.mktemp("fp8"))


@pytest.fixture(scope="session")
def released(fp8zoo, tmp_path_factory):
    """kind -> the FP8 release of the kind's FP8 base + its adapter, the whole gate run (the ragged one's
    end-to-end check on the gate's own FP8 dequantization: transformers refuses partial blocks)."""
    done = {}

    def build(kind: str):
        if kind not in done:
            folder = tmp_path_factory.mktemp(f"release-{kind}")
            manifest = write_manifest(folder, fp8zoo.fp8(kind), [(fp8zoo.adapter(kind), None)], "float8_e4m3fn")
            done[kind] = run_merge(manifest)
        return done[kind]

    return build


def peft_merged(dense_folder, base_values: dict[str, torch.Tensor], adapter) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload on `base_values`, in float64, rounded once to float32."""
    return {k: v.float() for k, v in peft_merged64(dense_folder, base_values, adapter).items()}


def peft_merged64(dense_folder, base_values: dict[str, torch.Tensor], adapter) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload on `base_values`, in float64."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dense_folder), dtype=torch.float64)
    model.load_state_dict({k: v.double() for k, v in base_values.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model, names = attach_adapters(model.eval(), [(adapter, 1.0)])
        peft_model.double()
        merged = peft_model.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def base_values(fp8zoo, kind: str) -> dict[str, torch.Tensor]:
    if kind == "square":  # transformers' own dequantization
        return {k: v.detach() for k, v in dequantized_base(fp8zoo.fp8(kind)).state_dict().items()}
    return own_dequantized(fp8zoo.fp8(kind))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("kind", ["square", "ragged"])
def test_release_bytes_are_transformers_quantizer_on_peft_merge(fp8zoo, released, kind):
    out = released(kind)
    release = load_output(out)
    base = load_file(fp8zoo.fp8(kind) / "model.safetensors")
    merged = peft_merged(fp8zoo.dense(kind), base_values(fp8zoo, kind), fp8zoo.adapter(kind))
    assert sorted(release) == sorted(base)  # the same FP8 tensors and scales, nothing else
    requantized = copied = 0
    for name, tensor in release.items():
        assert tensor.dtype == base[name].dtype, name
        if name.endswith("_scale_inv") or tensor.dtype != torch.float8_e4m3fn:
            continue
        changed = any(f".{t}." in name for t in ("q_proj", "v_proj", "down_proj", "gate_proj"))
        if changed:
            codes, scale = transformers_quantize(merged[name])
            requantized += 1
        else:  # no adapter changes it: the base's bytes
            codes, scale = base[name], base[name + "_scale_inv"]
            copied += 1
        assert torch.equal(_bits(tensor), _bits(codes)), name
        assert torch.equal(_bits(release[name + "_scale_inv"]), _bits(scale)), name
    assert (requantized, copied) == (8, 6)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    assert config["dtype"] == "bfloat16"
    sizes = [sum(t.numel() * t.element_size() for t in d.values()) for d in (release, base)]
    print(f"{kind}: release weights {sizes[0]} bytes, base {sizes[1]} bytes")
    assert sizes[0] == sizes[1]
    index_free = (out / "model.safetensors").stat().st_size
    assert abs(index_free - (fp8zoo.fp8(kind) / "model.safetensors").stat().st_size) < 4096  # headers differ


def test_control_release_bytes_differ_without_the_delta(fp8zoo, released):
    """Negative control: the base's weights quantized afresh (no delta) are not the release's bytes."""
    release = load_output(released("square"))
    values = base_values(fp8zoo, "square")
    name = "model.layers.0.self_attn.q_proj.weight"
    codes, _ = transformers_quantize(values[name].float())
    assert not torch.equal(_bits(release[name]), _bits(codes))


def test_release_loads_with_transformers_and_matches_peft(fp8zoo, released):
    """The release as transformers loads it (FP8 config, dequantized on the CPU) against PEFT's
    unmerged base + adapter on the dequantized base: within half the adapter's own effect (the gate's
    rule for the logit threshold; FP8 rounding of this random tiny model is most of the distance)."""
    from transformers import AutoModelForCausalLM

    out = released("square")
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        release = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no quantization_config given
        peft_model, _ = attach_adapters(
            dequantized_base(fp8zoo.fp8("square"), torch.float32), [(fp8zoo.adapter("square"), 1.0)]
        )
    assert type(release.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # dequantized on the CPU
    ref = logits(peft_model, ids)
    with peft_model.disable_adapter():
        base = logits(peft_model, ids)
    got = logits(release, ids)
    distance, effect = float((got - ref).abs().max()), float((base - ref).abs().max())
    print(f"max |logit diff| release vs PEFT {distance:.4f}, adapter effect {effect:.4f}")
    assert distance < 0.5 * effect


def test_gate_passes_and_checks_fp8(released):
    out = released("square")
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] is True
    checks = {c["id"]: c for c in report["checks"]}
    assert checks["algebra.fp8_elements"]["passed"] and checks["algebra.fp8_elements"]["figure"] <= 1.0
    assert checks["algebra.fp8_scales"]["detail"] == "all 36 blocks"  # 18 a layer: q 2x2, v 1x2, gate 3x2, down 2x3
    assert report["context"]["release_load"].startswith("transformers FineGrainedFP8Config")
    ragged = json.loads((released("ragged") / "verification.json").read_text())
    assert ragged["passed"] is True
    assert ragged["context"]["reference_base"] == f"dequantized by {BY_GATE_FP8}"
    assert ragged["context"]["release_load"] == "the gate's own FP8 dequantizer (partial blocks)"
    assert {c["id"] for c in ragged["checks"] if c["group"] == "end_to_end"} >= {"end_to_end.max_abs_logit_diff"}


def test_gates_own_fp8_views_are_transformers(fp8zoo, released):
    """The gate's own dequantization, which it uses where transformers refuses partial blocks, gives
    what transformers' FineGrainedFP8Config(dequantize=True) gives where it does not: the square
    release's logits and the square base's weights, bit for bit; and the ragged base's weights as
    the builder's own dequantization (float32(code) x scale, then bfloat16)."""
    from transformers import AutoModelForCausalLM

    from mergekit_lite.gate.fp8 import load_release
    from mergekit_lite.sources.checkpoint import read_checkpoint

    out = released("square")
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(4))
    blocks = {n: BLOCK for n, t in load_output(out).items() if t.dtype == torch.float8_e4m3fn}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_transformers = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    own = load_release(out, AutoModelForCausalLM, torch.float32, blocks)
    assert torch.equal(logits(own, ids), logits(by_transformers, ids))
    for kind in ("square", "ragged"):
        tensors = read_checkpoint(fp8zoo.fp8(kind)).tensors
        model, by = gate_dequantized_base(fp8zoo.fp8(kind), tensors, torch.bfloat16, {"device_map": "cpu"})
        want = base_values(fp8zoo, kind)
        assert by == (BY_GATE_FP8 if kind == "ragged" else BY_TRANSFORMERS_FP8)
        got = model.state_dict()
        assert all(torch.equal(_bits(got[n]), _bits(want[n])) for n in want), kind


def test_dense_release_of_a_ragged_fp8_base_passes_the_whole_gate(fp8zoo, tmp_path):
    """`dtype: bfloat16` from the DeepSeek-style ragged FP8 base: the end-to-end reference is PEFT on the
    gate's own dequantization (transformers' refuses the base)."""
    manifest = write_manifest(tmp_path, fp8zoo.fp8("ragged"), [(fp8zoo.adapter("ragged"), None)], "bfloat16")
    report = json.loads((run_merge(manifest) / "verification.json").read_text())
    assert report["passed"] is True
    assert report["context"]["reference_base"] == f"dequantized by {BY_GATE_FP8}"


def _rewrite(folder, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def candidate(released, tmp_path):
    def copy(kind: str = "square"):
        out = tmp_path / "candidate"
        shutil.copytree(released(kind), out)
        return out

    return copy


NAME = "model.layers.1.mlp.down_proj.weight"


def _wrong_block_scale(tensors) -> None:
    tensors[NAME + "_scale_inv"][0, 1] *= 2


def _without_delta(fp8zoo):
    values = base_values(fp8zoo, "square")

    def change(tensors) -> None:
        tensors[NAME], tensors[NAME + "_scale_inv"] = transformers_quantize(values[NAME].float())

    return change


def _verify(fp8zoo, folder, tmp_path):
    manifest = write_manifest(
        tmp_path, fp8zoo.fp8("square"), [(fp8zoo.adapter("square"), None)], "float8_e4m3fn", verify={"logits": False}
    )
    return verify_release(manifest, folder).to_dict()


@pytest.mark.parametrize("defect", ["wrong block scale", "quantized without the delta"])
def test_control_gate_fails_a_damaged_fp8_tensor(fp8zoo, candidate, tmp_path, defect):
    folder = candidate()
    _rewrite(folder, _wrong_block_scale if defect == "wrong block scale" else _without_delta(fp8zoo))
    report = _verify(fp8zoo, folder, tmp_path)
    failed = {c["id"]: c for c in report["checks"] if not c["passed"] and c["group"] != "integrity"}
    assert report["passed"] is False  # integrity fails too: the files no longer match SHA256SUMS
    assert set(failed) == {"algebra.fp8_elements"}, failed
    assert NAME in failed["algebra.fp8_elements"]["detail"]


def test_control_gate_fails_a_scale_not_from_its_block(fp8zoo, candidate, tmp_path):
    """A block whose codes were quantized with a scale twice its own (the same values, half the range)
    passes the element bound where rounding allows, but not the scale check."""
    folder = candidate()

    def change(tensors) -> None:
        scale = tensors[NAME + "_scale_inv"]
        codes = tensors[NAME]
        block = codes[:128, 128:256].float() / 2
        codes[:128, 128:256] = block.to(torch.float8_e4m3fn)
        scale[0, 1] *= 2

    _rewrite(folder, change)
    report = _verify(fp8zoo, folder, tmp_path)
    failed = {c["id"]: c for c in report["checks"] if not c["passed"] and c["group"] != "integrity"}
    assert set(failed) == {"algebra.fp8_scales"}, failed
    assert failed["algebra.fp8_scales"]["detail"] == f"{NAME}[0, 1]"


def test_clean_copy_passes_verify(fp8zoo, candidate, tmp_path):
    """The undamaged release, checked the same way as the controls, passes."""
    assert _verify(fp8zoo, candidate(), tmp_path)["passed"] is True


def test_plan_predicts_the_release_size(fp8zoo, released, tmp_path):
    from mergekit_lite.pipeline import prepare

    manifest = write_manifest(tmp_path, fp8zoo.fp8("square"), [(fp8zoo.adapter("square"), None)], "float8_e4m3fn")
    plan = prepare(manifest, for_output=False).plan
    release = load_output(released("square"))
    assert plan.total_bytes == sum(t.numel() * t.element_size() for t in release.values())
    dense = prepare(write_manifest(tmp_path, fp8zoo.fp8("square"), [(fp8zoo.adapter("square"), None)], "bfloat16",
                                   name="dense.yaml"), for_output=False).plan  # fmt: skip
    assert plan.total_bytes < 0.6 * dense.total_bytes
    assert plan.quantization_config == QUANTIZATION_CONFIG and dense.quantization_config is None
    from mergekit_lite.plan.render import plan_table

    assert "release   fine-grained FP8: 14 weights in 128x128 blocks, 8 quantized from the merge" in plan_table(plan)
    assert {t.fp8_block for t in plan.tensors if t.fp8_block} == {BLOCK}


def _cli_merge(manifest):
    return CliRunner().invoke(main, ["merge", str(manifest)])


@pytest.mark.parametrize(
    ("base", "sections", "needle"),
    [
        ("nf4", {}, "writes fine-grained FP8 from an FP8 or a dense base, but base"),
        ("dense", {}, "that transformers' FP8 quantizer converts has both dimensions multiples of 128x128"),
        (
            "fp8",
            {"output": {"path": "./out", "gguf": {"outtype": "bf16"}}},
            "`output.gguf` with `dtype: float8_e4m3fn`",
        ),
        ("fp8", {"verify": {"runtimes": ["transformers4"]}}, "`verify.runtimes: ['transformers4']` with"),
    ],
)
def test_bad_fp8_requests_one_line_exit_2(fp8zoo, qzoo, tmp_path, base, sections, needle):
    folder = {"nf4": lambda: qzoo.quantized("nf4-dq"), "dense": qzoo.dense}.get(base, lambda: fp8zoo.fp8("square"))()
    adapter = fp8zoo.adapter("square") if base == "fp8" else qzoo.adapter(qzoo.dense(), ["q_proj"])
    manifest = write_manifest(tmp_path, folder, [(adapter, None)], "float8_e4m3fn", **sections)
    result = _cli_merge(manifest)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "out").exists()


def _ue8m0(folder) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["scale_fmt"] = "ue8m0"
    (folder / "config.json").write_text(json.dumps(config))


def _bf16_scales(folder) -> None:
    _rewrite(folder, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items() if k.endswith("_scale_inv")}))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [(_ue8m0, "has `scale_fmt: ue8m0` (power-of-two scales)"), (_bf16_scales, "_scale_inv` as BF16; only float32")],
)
def test_fp8_base_scales_not_recomputed_one_line_exit_2(fp8zoo, tmp_path, damage, needle):
    base = tmp_path / "base"
    shutil.copytree(fp8zoo.fp8("square"), base)
    damage(base)
    manifest = write_manifest(tmp_path, base, [(fp8zoo.adapter("square"), None)], "float8_e4m3fn")
    result = _cli_merge(manifest)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_control_good_fp8_request_merges_from_the_cli(fp8zoo, tmp_path):
    manifest = write_manifest(
        tmp_path, fp8zoo.fp8("ragged"), [(fp8zoo.adapter("ragged"), None)], "float8_e4m3fn", verify={"logits": False}
    )
    result = _cli_merge(manifest)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_sharded_release_by_processes_keeps_each_scale_with_its_weight(fp8zoo, released, tmp_path):
    """Small shards merged by worker processes: every weight_scale_inv in its weight's shard (a worker
    writes one shard), the bytes those of the one-shard release, and the gate passes. The shard size
    fits an MLP weight (98,304 bytes) but not its 24-byte scales too: they join it all the same."""
    manifest = write_manifest(
        tmp_path, fp8zoo.fp8("square"), [(fp8zoo.adapter("square"), None)], "float8_e4m3fn", max_shard_size="98320B",
        verify={"logits": False}, executor={"kind": "processes", "workers": 2},
    )  # fmt: skip
    out = run_merge(manifest)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 4
    scales = [n for n in weight_map if n.endswith("_scale_inv")]
    assert len(scales) == 14 and all(weight_map[n] == weight_map[n[: -len("_scale_inv")]] for n in scales)
    gate = "model.layers.0.mlp.gate_proj.weight"
    assert sorted(n for n, f in weight_map.items() if f == weight_map[gate]) == [gate, gate + "_scale_inv"]
    sharded, whole = load_output(out), load_output(released("square"))
    assert sorted(sharded) == sorted(whole)
    assert all(torch.equal(_bits(sharded[n]), _bits(whole[n])) for n in whole)
    assert json.loads((out / "verification.json").read_text())["passed"] is True


# --------------------------------------------------------------------------- a dense base


LAYERS = range(2)
MLP = ("down_proj", "gate_proj", "up_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# variant -> the manifest's `fp8` section, the block, the modules in FP8 (per layer), the ones kept dense
DENSE_VARIANTS = {
    # transformers' defaults: 128x128; lm_head kept; the MLP's 320 is not a multiple of 128
    "default": (None, (128, 128), ATTENTION, ["lm_head", *(f"model.layers.{i}.mlp.{m}" for i in LAYERS for m in MLP)]),
    # 64x64 fits the MLP too; q_proj kept dense, and the list replaces the defaults: lm_head (200 rows) is
    # converted by transformers, but is not a multiple of 64, so it stays dense and is named
    "options": (
        {"weight_block_size": [64, 64], "modules_to_not_convert": ["q_proj"]},
        (64, 64),
        ("k_proj", "v_proj", "o_proj", *MLP),
        ["lm_head", "q_proj"],
    ),
}


@pytest.fixture(scope="session")
def released_dense(fp8zoo, tmp_path_factory):
    """variant -> the FP8 release of the bfloat16 `ragged` base + its adapter; the gate's end-to-end check on."""
    done = {}

    def build(variant: str):
        if variant not in done:
            folder = tmp_path_factory.mktemp(f"release-dense-{variant}")
            base, adapter = fp8zoo.dense("ragged"), fp8zoo.adapter("ragged")
            manifest = write_manifest(folder, base, [(adapter, None)], "float8_e4m3fn", fp8=DENSE_VARIANTS[variant][0])
            done[variant] = run_merge(manifest)
        return done[variant]

    return build


@pytest.mark.parametrize("variant", list(DENSE_VARIANTS))
def test_dense_base_release_bytes_are_transformers_quantizer_on_peft_merge(fp8zoo, released_dense, variant):
    _, block, modules, kept = DENSE_VARIANTS[variant]
    out = released_dense(variant)
    release = load_output(out)
    base = load_file(fp8zoo.dense("ragged") / "model.safetensors")
    merged = peft_merged64(fp8zoo.dense("ragged"), base, fp8zoo.adapter("ragged"))
    fp8 = sorted(n for n, t in release.items() if t.dtype == torch.float8_e4m3fn)
    assert fp8 == sorted(n for n in base if n.endswith(tuple(f"{m}.weight" for m in modules)))
    assert sorted(release) == sorted([*base, *(n + "_scale_inv" for n in fp8)])
    for name in fp8:  # changed by the adapter or not: quantized from the weight as transformers does
        codes, scale = transformers_quantize(merged[name].float(), block)
        assert torch.equal(_bits(release[name]), _bits(codes)), name
        assert torch.equal(_bits(release[name + "_scale_inv"]), _bits(scale)), name
    changed = {n for n in base if n.endswith(tuple(f"{m}.weight" for m in TARGETS))}
    for name in sorted(set(base) - set(fp8)):  # dense: the merge rounded once to bfloat16 (unchanged: the base)
        assert release[name].dtype == torch.bfloat16
        assert float(half_ulps(release[name], merged[name], torch.bfloat16).max()) <= 1.0, name
        if name not in changed:
            assert torch.equal(_bits(release[name]), _bits(base[name])), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {**QUANTIZATION_CONFIG, "weight_block_size": list(block), "modules_to_not_convert": sorted(kept)}
    sizes = [sum(t.numel() * t.element_size() for t in d.values()) for d in (release, base)]
    print(f"dense base, {variant}: release weights {sizes[0]} bytes, bfloat16 base {sizes[1]} bytes")
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize("variant", list(DENSE_VARIANTS))
def test_dense_base_release_converts_what_transformers_converts(released_dense, variant):
    """transformers, loading the release's quantization_config as a pre-quantized FP8 model (on a GPU, where
    it does not dequantize), makes FP8Linear modules of exactly the release's FP8 weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Linear, replace_with_fp8_linear
    from transformers.quantizers.base import HfQuantizer

    config = AutoConfig.from_pretrained(released_dense(variant))
    qc = FineGrainedFP8Config(**{k: v for k, v in config.quantization_config.items() if k != "quant_method"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = HfQuantizer.get_modules_to_not_convert(model, qc.modules_to_not_convert, model._keep_in_fp32_modules)
    replace_with_fp8_linear(model, modules_to_not_convert=skip, quantization_config=qc, pre_quantized=True)
    converted = sorted(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, FP8Linear))
    release = load_output(released_dense(variant))
    assert converted == sorted(n for n, t in release.items() if t.dtype == torch.float8_e4m3fn)
    assert len(converted) == 2 * len(DENSE_VARIANTS[variant][2])


@pytest.mark.parametrize("variant", list(DENSE_VARIANTS))
def test_dense_base_release_loads_and_matches_peft(fp8zoo, released_dense, variant):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        release = AutoModelForCausalLM.from_pretrained(released_dense(variant), dtype=torch.float32).eval()
        base = AutoModelForCausalLM.from_pretrained(fp8zoo.dense("ragged"), dtype=torch.float32).eval()
        peft_model, _ = attach_adapters(base, [(fp8zoo.adapter("ragged"), 1.0)])
    ref = logits(peft_model, ids)
    with peft_model.disable_adapter():
        effect = float((logits(peft_model, ids) - ref).abs().max())
    distance = float((logits(release, ids) - ref).abs().max())
    print(f"dense base, {variant}: max |logit diff| release vs PEFT {distance:.4f}, adapter effect {effect:.4f}")
    assert distance < 0.5 * effect
    report = json.loads((released_dense(variant) / "verification.json").read_text())
    assert report["passed"] is True
    checks = {c["id"]: c for c in report["checks"]}
    assert f"{2 * len(DENSE_VARIANTS[variant][2])} FP8 tensors" in checks["algebra.fp8_elements"]["detail"]
    assert checks["end_to_end.max_abs_logit_diff"]["passed"]


@pytest.mark.parametrize(
    ("base", "fp8", "dtype", "needle"),
    [
        ("dense", {"weight_block_size": [0, 128]}, "float8_e4m3fn", "is not [rows, columns] of a block"),
        ("dense", {"modules_to_not_convert": ["q_proj"]}, "bfloat16", "it needs `dtype: float8_e4m3fn`, not bfloat16"),
        ("fp8", {"weight_block_size": [64, 64]}, "float8_e4m3fn", "is stored as FP8 already and its release keeps"),
        ("dense", {"block": [64, 64]}, "float8_e4m3fn", "block"),
    ],
)
def test_bad_fp8_options_one_line_exit_2(fp8zoo, tmp_path, base, fp8, dtype, needle):
    folder = fp8zoo.dense("ragged") if base == "dense" else fp8zoo.fp8("ragged")
    manifest = write_manifest(tmp_path, folder, [(fp8zoo.adapter("ragged"), None)], dtype, fp8=fp8)
    result = _cli_merge(manifest)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the gate's bound, alone


def _bound_case(seed: int, shape: tuple[int, int], spread: float):
    """A float32 weight whose magnitudes span 2^-spread .. 1 (so that blocks hold e4m3 subnormals and
    values on binade edges), quantized by transformers, and the plan entry the gate checks it as."""
    from mergekit_lite.plan.plan import PlannedTensor

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.exp2(-spread * torch.rand(shape, generator=gen))
    w[:3, :3] = torch.tensor([1.0, 0.5, 2.0**-6])  # powers of two: e4m3 ties and the smallest normal
    codes, scale = transformers_quantize(w)
    t = PlannedTensor("x.weight", "x.weight", "F32", "F8_E4M3", shape, fp8_block=BLOCK)
    return t, w, codes, scale


@pytest.mark.parametrize(
    ("seed", "shape", "spread"), [(0, (256, 384), 4.0), (1, (200, 130), 12.0), (2, (128, 128), 0.0)]
)
def test_gate_bound_accepts_transformers_quantization_and_is_tight(seed, shape, spread):
    from mergekit_lite.gate.fp8 import Fp8Worst, check_fp8

    t, w, codes, scale = _bound_case(seed, shape, spread)
    worst = Fp8Worst()
    check_fp8(t, codes, scale, w, lambda op, i: None, worst)
    assert worst.beyond == 0 and not worst.bad_blocks, (worst.name, worst.index, worst.share)
    assert worst.share > 0.9  # half an e4m3 step is reached: the bound is not loose
    assert worst.elements == w.numel()


@pytest.mark.parametrize("step", ["code one step up", "scale one float32 ulp up x 2^-3"])
def test_control_gate_bound_refuses_one_step_off(step):
    from mergekit_lite.gate.fp8 import Fp8Worst, check_fp8

    t, w, codes, scale = _bound_case(3, (256, 256), 4.0)
    if step == "code one step up":  # the next e4m3 value of one element (|code| < 448)
        bits = codes.view(torch.uint8)
        i = int(((codes.float().abs() < 400) & (codes.float() > 0.1)).view(-1).nonzero()[0])
        bits.view(-1)[i] += 1
    else:  # the block's scale 1/8 larger: every element moves about 1.6 e4m3 steps
        scale[1, 0] *= 1.125
    worst = Fp8Worst()
    check_fp8(t, codes, scale, w, lambda op, i: None, worst)
    assert worst.beyond > 0 and worst.failing == ["x.weight"]
