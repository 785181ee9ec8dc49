"""Every architecture of tests/architectures.py, merged through the whole pipeline and its gate.

Each case: the float32 release's logits (class logits for a classification head, decoder logits
over the encoded prompt for an encoder-decoder; for a vision-language base with an image processor,
on the gate's image prompt too) equal the unmerged PeftModel's within 1e-5 relative; the gate
passed; and the base without the adapter fails that same comparison (the negative control: the
adapter really changes the model, and the comparison can fail).
"""

from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from mergekit_lite.errors import MergekitError
from mergekit_lite.pipeline import execute, prepare

from architectures import (
    ARCHES,
    CASES,
    CASES_BY_ID,
    PROMPT_IDS,
    README_START,
    VISION_TOWER,
    Case,
    build_adapter,
    build_base,
    readme_section,
    readme_table,
)
from helpers import merged_state_dict, violations, write_manifest

REL = 1e-5
REPO = Path(__file__).resolve().parent.parent


class ArchZoo:
    """Bases, adapters and releases of the architecture cases, each built once per session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._bases: dict[str, Path] = {}
        self._adapters: dict[str, Path] = {}
        self._releases: dict[str, tuple[Path, dict]] = {}

    def base(self, arch: str) -> Path:
        if arch not in self._bases:
            self._bases[arch] = build_base(arch, self.root / "bases" / arch)
        return self._bases[arch]

    def adapter(self, case: Case | str) -> Path:
        case = CASES_BY_ID[case] if isinstance(case, str) else case
        if case.id not in self._adapters:
            self._adapters[case.id] = build_adapter(case, self.base(case.arch), self.root / "adapters" / case.id)
        return self._adapters[case.id]

    def release(self, case: Case | str) -> tuple[Path, dict]:
        case = CASES_BY_ID[case] if isinstance(case, str) else case
        if case.id not in self._releases:
            manifest = write_manifest(
                self.root / "merges" / case.id,
                self.base(case.arch),
                [self.adapter(case)],
                "float32",
                verify={"max_new_tokens": 4},
                output=None if ARCHES[case.arch].portable else {"path": "./out", "compat": False},
            )
            result = execute(prepare(manifest, hash_inputs=True))
            self._releases[case.id] = (result.output, result.report.to_dict())
        return self._releases[case.id]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two on a shared machine (their matmuls are
    microseconds, and a second thread only waits for the first)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def arch_zoo(tmp_path_factory) -> ArchZoo:
    return ArchZoo(tmp_path_factory.mktemp("architectures"))


def _inputs(model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(*PROMPT_IDS, (2, 9), generator=gen)
    if model.main_input_name == "input_features":  # a speech encoder: log-mel-shaped features
        features = torch.randn(2, model.config.num_mel_bins, 2 * model.config.max_source_positions, generator=gen)
        return {"input_features": features, "decoder_input_ids": ids}
    if type(model).__name__.endswith("ForSequenceClassification") and model.config.is_encoder_decoder:
        return {"input_ids": torch.cat([ids, torch.full((2, 1), model.config.eos_token_id)], 1)}  # BART's: EOS-final
    if model.config.is_encoder_decoder and "decoder_input_ids" in inspect.signature(model.forward).parameters:
        return {"input_ids": ids, "decoder_input_ids": torch.randint(*PROMPT_IDS, (2, 5), generator=gen)}
    return {"input_ids": ids}


def _logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits; start and end logits; or the hidden states of a model without a head (feature extraction)."""
    with torch.no_grad():
        out = model(**inputs)
    if getattr(out, "start_logits", None) is not None:  # extractive question answering
        return torch.stack([out.start_logits, out.end_logits], -1).to(torch.float64)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).to(torch.float64)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((ours - ref).abs().max()) <= REL * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_release_matches_unmerged_peft(case_id: str, arch_zoo: ArchZoo) -> None:
    from peft import PeftModel

    case = CASES_BY_ID[case_id]
    out, report = arch_zoo.release(case_id)
    failed = [f"{c['group']}/{c['name']}: {c['figure']} ({c['detail']})" for c in report["checks"] if not c["passed"]]
    assert report["passed"], f"the gate failed: {failed}"
    assert report["context"]["model_class"] == ARCHES[case.arch].model_class
    assert "end_to_end" not in report["skipped"]

    cls = getattr(transformers, ARCHES[case.arch].model_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = cls.from_pretrained(out, dtype=torch.float32).eval()
        reference = PeftModel.from_pretrained(cls.from_pretrained(arch_zoo.base(case.arch)), arch_zoo.adapter(case_id))
    reference.eval()
    prompts = [_inputs(merged)]
    if ARCHES[case.arch].processor is not None:  # the gate's image prompt (gate/images.py), as the gate ran it
        assert report["context"]["image_prompt"]["used"], report["context"]["image_prompt"]
        prompts.append(_image_inputs(arch_zoo.base(case.arch), reference.get_base_model()))
    refs, bases = [], []
    for inputs in prompts:
        ref = _logits(reference, inputs)
        ours = _logits(merged, inputs)
        assert ours.shape == ref.shape
        diff = float((ours - ref).abs().max())
        assert _close(ours, ref), (
            f"release vs unmerged PeftModel: max |diff| {diff:.3g}, max |ref| {ref.abs().max():.3g}"
        )
        with reference.disable_adapter():
            bases.append(_logits(reference, inputs))
        refs.append(ref)
    assert not all(_close(b, r) for b, r in zip(bases, refs)), "negative control: the base matches base + adapter"
    if case.id.endswith("-vision"):  # only the image prompt runs the vision tower
        assert _close(bases[0], refs[0]) and not _close(bases[1], refs[1])

    # the release keeps the base's on-disk names: a drop-in replacement for it
    base_index = _tensor_names(arch_zoo.base(case.arch))
    assert _tensor_names(out) - base_index <= {"lm_head.weight", "language_model.lm_head.weight"}
    assert base_index <= _tensor_names(out)


def _image_inputs(base: Path, model) -> dict[str, torch.Tensor]:
    from mergekit_lite.gate.images import image_prompt
    from mergekit_lite.sources.tokenizer import load_tokenizer

    prompt = image_prompt(base, model, load_tokenizer(base))
    assert prompt.ids is not None, prompt.reason
    return {"input_ids": prompt.ids.unsqueeze(0), **prompt.inputs}


def _tensor_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names |= set(f.keys())
    return names


def test_modules_the_prompts_do_not_reach_are_named(arch_zoo: ArchZoo) -> None:
    """Without an image processor (llava_v5 ships none) the prompts are text only and never run the
    vision tower: the report names its changed modules as covered by the algebra check only, and
    says there is no image prompt and why; a vision-only adapter passes on the dtype's threshold
    (not on 0 <= 0) and says that it changes none of the logits. With the image prompt the same
    LoRA is reached (none named), and a module that no input runs stays named (Gemma 3's unused
    SigLIP head); a language-only adapter reports none (control)."""
    _, mixed = arch_zoo.release(Case("llava_v5-all", "llava_v5", {"target_modules": "all-linear"}))
    unreached = mixed["context"].get("modules_not_reached", [])
    assert unreached and all("vision" in m or "projector" in m for m in unreached), unreached
    detail = _detail(mixed, "max_abs_logit_diff")
    assert "only the per-tensor algebra check covers them" in detail
    assert "no image prompt: the base ships no image processor" in detail
    assert mixed["context"]["image_prompt"] == {
        "used": False,
        "reason": "the base ships no image processor (preprocessor_config.json)",
    }

    vision = Case("llava_v5-vision", "llava_v5", {"target_modules": VISION_TOWER["llava"]})
    _, report = arch_zoo.release(vision)
    assert report["passed"]
    assert len(report["context"]["modules_not_reached"]) == 3  # q_proj, v_proj and fc1 of its one layer
    assert "the adapters change none of these logits" in _detail(report, "max_abs_logit_diff")
    assert report["context"]["adapter_effect_max_abs_logit_diff"] == 0
    assert next(c for c in report["checks"] if c["name"] == "max_abs_logit_diff")["threshold"] > 0

    for case_id in ("llava", "llava-vision", "qwen2_5_vl-vision", "gemma3-vision"):
        _, reached = arch_zoo.release(case_id)
        assert "modules_not_reached" not in reached["context"], (case_id, reached["context"]["modules_not_reached"])
        assert reached["context"]["adapter_effect_max_abs_logit_diff"] > 0
        assert "image prompt (prompt 4)" in _detail(reached, "max_abs_logit_diff")
    _, gemma = arch_zoo.release("gemma3")
    assert gemma["context"]["modules_not_reached"] == ["model.vision_tower.head.attention.out_proj"]

    _, language = arch_zoo.release("llava-language")
    assert "modules_not_reached" not in language["context"]
    assert "never ran" not in _detail(language, "max_abs_logit_diff")


@pytest.mark.parametrize(
    ("case_id", "module"),
    [
        ("whisper", "encoder.layers.0.fc1"),
        ("bert", "layer.1.attention"),
        ("bert_qa", "layer.1.attention"),
        ("bart_seq_cls", "self_attn"),  # every layer: one layer moves its class logits by only ~3e-5
        ("t5_encoder", "block.1.layer"),
    ],
)
def test_end_to_end_runs_speech_encoders_and_bare_models(
    case_id: str, module: str, arch_zoo: ArchZoo, tmp_path: Path
) -> None:
    """Whisper's encoder reads the gate's synthetic log-mel features, a model without a head (feature
    extraction: BertModel, T5EncoderModel) is compared on its hidden states, a question-answering head
    on its start and end logits, BART's classifier on EOS-final ids: every changed module runs, and a
    release with one of them left unmerged (its base tensor restored) fails the end-to-end check."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mergekit_lite.gate.endtoend import EndToEnd, Placement, check_end_to_end
    from mergekit_lite.gate.report import GateReport
    from mergekit_lite.gate.tolerances import TOLERANCES

    out, report = arch_zoo.release(case_id)
    assert report["passed"] and "modules_not_reached" not in report["context"]
    assert report["context"]["adapter_effect_max_abs_logit_diff"] > 0
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    [shard] = list(tampered.glob("*.safetensors"))
    [base_file] = list(arch_zoo.base(CASES_BY_ID[case_id].arch).glob("*.safetensors"))
    tensors, base = load_file(shard), load_file(base_file)
    restored = [k for k in tensors if module in k and k in base and not torch.equal(tensors[k], base[k])]
    assert restored, f"no merged tensor under {module}"
    tensors.update({k: base[k] for k in restored})
    save_file(tensors, str(shard), metadata={"format": "pt"})

    def end_to_end(candidate: Path) -> GateReport:  # the check alone (the algebra check fails first)
        report = GateReport(dtype="F32")
        limits = dict(TOLERANCES["F32"])
        adapters = [(arch_zoo.adapter(case_id), 1.0)]
        check = EndToEnd(candidate, arch_zoo.base(case.arch), adapters, Placement(), None, None, 4, limits)
        check_end_to_end(report, replace(check, model_class=ARCHES[case.arch].model_class))
        return report

    case = CASES_BY_ID[case_id]
    assert end_to_end(out).passed  # control: the same check on the release as merged
    failed = {c.name for c in end_to_end(tampered).failures}
    rows = [(c.name, c.figure, c.threshold) for c in end_to_end(tampered).checks]
    assert "max_abs_logit_diff" in failed, f"the end-to-end check missed {restored}: {rows}"


def _detail(report: dict, name: str) -> str:
    return next(c["detail"] for c in report["checks"] if c["name"] == name)


EXPERT_CASES = [c.id for c in CASES if "target_parameters" in c.what]


def _expert_tensor(name: str) -> bool:
    return ".experts." in name or name.endswith((".mlp.gate.weight", ".mlp.router.weight"))


@pytest.mark.parametrize("case_id", EXPERT_CASES)
def test_expert_tensors_match_peft_merge_and_unload(case_id: str, arch_zoo: ArchZoo) -> None:
    """The release's experts and router, as transformers loads them (fused from per-expert tensors
    where the base stores them one by one), equal PEFT's merge_and_unload tensor by tensor within the
    float32 tolerance; the base's own tensors do not (negative control)."""
    from peft import PeftModel

    case = CASES_BY_ID[case_id]
    out, _ = arch_zoo.release(case_id)
    cls = getattr(transformers, ARCHES[case.arch].model_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_model = cls.from_pretrained(arch_zoo.base(case.arch), dtype=torch.float32)
        base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        peft_model = PeftModel.from_pretrained(base_model, arch_zoo.adapter(case_id))
        reference = {k: v for k, v in merged_state_dict(peft_model, ["default"]).items() if _expert_tensor(k)}
        ours = cls.from_pretrained(out, dtype=torch.float32).state_dict()
    fused = [k for k in reference if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == 4 and len(reference) >= 6, sorted(reference)
    assert not violations(ours, reference, base, torch.float32)
    changed = {k for k in reference if not torch.equal(reference[k], base[k])}  # not the experts' biases
    assert set(fused) <= changed and any(k.endswith((".gate.weight", ".router.weight")) for k in changed)
    unmerged = violations(base, {k: reference[k] for k in changed}, base, torch.float32)
    assert {v.name for v in unmerged} == changed, "negative control: the base equals the merge somewhere"


@pytest.mark.parametrize("case_id", ["mixtral", "mixtral_v5", "gpt_oss-experts"])
def test_gate_checks_every_expert(case_id: str, arch_zoo: ArchZoo, tmp_path: Path) -> None:
    """One weight of one expert, off by far less than the adapter changes it, fails the per-tensor
    algebra check, which names that expert's tensor (its block of a fused tensor: `name[e]`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mergekit_lite.pipeline import verify_release

    out, report = arch_zoo.release(case_id)
    assert report["passed"]
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    [shard] = list(tampered.glob("*.safetensors"))
    tensors = load_file(shard)
    legacy = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    name = legacy if legacy in tensors else "model.layers.1.mlp.experts.gate_up_proj"
    tensors[name] = tensors[name].clone()
    nudge = 1e-4 * float(tensors[name].abs().max())  # ~1700 ulps of the largest weight, far below the delta
    [base_file] = list(arch_zoo.base(CASES_BY_ID[case_id].arch).glob("*.safetensors"))
    assert float((tensors[name] - load_file(base_file)[name]).abs().max()) > 100 * nudge
    if tensors[name].dim() == 3:
        tensors[name][2, 5, 7] += nudge
    else:
        tensors[name][5, 7] += nudge
    save_file(tensors, str(shard), metadata={"format": "pt"})
    checked = verify_release(out, against=tampered).to_dict()
    failed = [c for c in checked["checks"] if c["group"] == "algebra" and not c["passed"]]
    assert failed, "the algebra check missed a changed expert weight"
    expect = name if "experts.2." in name else f"{name}[2]"
    assert any(expect in c["detail"] for c in failed), [c["detail"] for c in failed]


def test_plan_splits_the_fused_delta_onto_the_stored_experts(arch_zoo: ArchZoo, tmp_path: Path) -> None:
    """Experts stored one by one: each gets its expert's block of the fused delta (Mixtral's w1 and w3
    are rows 0:64 and 64:128 of gate_up_proj [4, 128, 32]); stored fused: one op on the whole."""
    from mergekit_lite.pipeline import run_plan
    from mergekit_lite.plan.render import plan_table

    plans = {}
    for case_id in ("mixtral", "mixtral_v5"):
        manifest = write_manifest(tmp_path / case_id, arch_zoo.base(case_id), [arch_zoo.adapter(case_id)], "float32")
        plans[case_id] = {t.name: t.ops for t in run_plan(manifest).tensors}
    legacy, fused = plans["mixtral"], plans["mixtral_v5"]
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    [(op)] = fused[gate_up]
    assert (op.layout, op.experts, op.expert, op.block, op.scale) == ("experts", 4, -1, (), 2.0)
    assert op.keys[0].endswith("layers.0.mlp.experts.base_layer.lora_A.weight")  # the inner wrapper
    w1, w3 = (legacy[f"model.layers.0.block_sparse_moe.experts.2.{w}.weight"] for w in ("w1", "w3"))
    assert [(o.expert, o.block, o.keys) for o in w1 + w3] == [
        (2, (0, 64, 0, 32), op.keys),
        (2, (64, 128, 0, 32), op.keys),
    ]
    [down] = legacy["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    assert (down.expert, down.block, down.keys[0]) == (3, (0, 32, 0, 64), op.keys[0].replace(".base_layer", ""))
    [router] = legacy["model.layers.0.block_sparse_moe.gate.weight"]
    assert (router.layout, router.experts) == ("linear", 0)
    assert "a0 lora_expert[2/4] x2" in plan_table(run_plan(tmp_path / "mixtral" / "manifest.yaml"))


def test_fused_experts_are_merged_one_expert_at_a_time(arch_zoo: ArchZoo, tmp_path: Path, monkeypatch) -> None:
    """A fused expert tensor is merged expert by expert: the exact merge only ever sees one expert's
    matrix (the plan's memory figure counts one such block, not a float copy of the whole)."""
    from mergekit_lite.io.format import read_header
    from mergekit_lite.io.reader import TensorReader
    from mergekit_lite.merge import merge as merging

    manifest = write_manifest(tmp_path, arch_zoo.base("mixtral_v5"), [arch_zoo.adapter("mixtral_v5")], "float32")
    job = prepare(manifest, for_output=False)
    [t] = [t for t in job.plan.tensors if t.name == "model.layers.1.mlp.experts.gate_up_proj"]
    seen = []
    exact_merge = merging.exact.merge

    def recording(base, terms, out, *args, **kwargs):
        seen.append((tuple(base.shape), tuple(out.shape)))
        return exact_merge(base, terms, out, *args, **kwargs)

    monkeypatch.setattr(merging.exact, "merge", recording)
    cpu = torch.device("cpu")
    factors = merging._Factors(job.adapters, cpu)
    merged = merging.merge_tensor(t, TensorReader(job.checkpoint.tensors), factors, cpu)
    factors.close()
    assert seen == [((128, 32), (128, 32))] * 4
    out, _ = arch_zoo.release("mixtral_v5")
    released = TensorReader(read_header(out / "model.safetensors").tensors)
    assert torch.equal(merged, released.get(t.name))  # what the release holds
    assert not torch.equal(merged, TensorReader(job.checkpoint.tensors).get(t.source))


@pytest.mark.parametrize(
    ("arch", "module", "refusal"),
    [
        ("t5", "shared", r"changes `shared.weight`, which this T5ForConditionalGeneration ties to `encoder.embed"),
        ("bart", "shared", r"changes `model.shared.weight`, which this BartForConditionalGeneration ties to"),
        ("bart", "lm_head", r"no longer ties `model.encoder.embed_tokens.weight`, `model.decoder.embed_tokens"),
    ],
)
def test_lora_on_tied_seq2seq_embeddings_is_refused_with_the_reason(
    arch: str, module: str, refusal: str, arch_zoo: ArchZoo, tmp_path: Path
) -> None:
    """T5 and BART tie `shared` to the encoder's and decoder's `embed_tokens` and to `lm_head`. PEFT's
    LoRA on `shared` changes only what runs through that module, here nothing (the unmerged model's
    logits are the base's), which a merge into the one stored tensor cannot express; a LoRA on BART's
    lm_head unties it, and untied BART no longer ties its `embed_tokens` either, which the checkpoint
    does not store. Both refused at plan time, saying so, nothing written; T5's lm_head merges (t5-head)."""
    from peft import PeftModel

    case = Case(f"{arch}-{module}", arch, {"target_modules": [module], "task_type": "SEQ_2_SEQ_LM"})
    adapter = build_adapter(case, arch_zoo.base(arch), tmp_path / "adapter")
    if module == "shared":
        cls = getattr(transformers, ARCHES[arch].model_class)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = PeftModel.from_pretrained(cls.from_pretrained(arch_zoo.base(arch)), adapter).eval()
        inputs = _inputs(reference)
        with reference.disable_adapter():
            base = _logits(reference, inputs)
        assert torch.equal(_logits(reference, inputs), base), "PEFT's LoRA on `shared` changed the logits"
    manifest = write_manifest(tmp_path, arch_zoo.base(arch), [adapter], "float32")
    with pytest.raises(MergekitError, match=refusal):
        prepare(manifest)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["use_dora", "lora_bias"])
def test_target_parameters_refused_where_peft_refuses(option: str, arch_zoo: ArchZoo, tmp_path: Path) -> None:
    """PEFT's ParamWrapper cannot be built with DoRA or a LoRA bias: such a config is refused at read
    time, naming the option, nothing written; the same adapter without it merges (the cases above)."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(arch_zoo.adapter("mixtral"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"]
    config[option] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    manifest = write_manifest(tmp_path, arch_zoo.base("mixtral"), [adapter], "float32")
    with pytest.raises(MergekitError, match=f"`target_parameters` is set together with `{option}`.*ParamWrapper"):
        prepare(manifest)
    assert not (tmp_path / "out").exists()


def test_readme_lists_exactly_the_tested_architectures() -> None:
    text = (REPO / "README.md").read_text()
    section = readme_section(text)
    assert section is not None, f"README.md has no {README_START} section"
    assert section == readme_table(), "README.md's architectures are stale: run `python tests/architectures.py --write`"
    assert len({c.arch for c in CASES}) >= 25


def test_both_checkpoint_layouts_are_kept(arch_zoo: ArchZoo) -> None:
    """save_pretrained's layout (legacy names, experts one by one) and the module-name layout
    (fused experts) are both merged, each release keeping its base's names (checked per case above);
    here: the two layouts really differ."""
    legacy, modern = _tensor_names(arch_zoo.base("llava")), _tensor_names(arch_zoo.base("llava_v5"))
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in legacy
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in modern
    assert not legacy & modern
    experts = _tensor_names(arch_zoo.base("mixtral_v5"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in experts
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in _tensor_names(arch_zoo.base("mixtral"))
    out, _ = arch_zoo.release("mixtral_v5")
    assert _tensor_names(out) == experts


def test_processor_files_ship_and_are_checked(arch_zoo: ArchZoo, tmp_path: Path) -> None:
    """The base's processor_config.json (LLaVA's processor, its image processor inside) ships byte
    for byte, and the gate checks it: a release whose copy differs or is missing fails the check
    (negative controls); a base without one gets no such check."""
    import shutil

    from mergekit_lite.gate.packaging import check_processor_files
    from mergekit_lite.gate.report import GateReport

    base = arch_zoo.base("llava")
    out, report = arch_zoo.release("llava")
    name = "processor_config.json"
    assert (out / name).read_bytes() == (base / name).read_bytes()
    assert name in (out / "SHA256SUMS").read_text()
    [row] = [c for c in report["checks"] if c["name"] == "processor files as the source"]
    assert row["passed"]
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    (tampered / name).write_text((out / name).read_text().replace("32", "64"))
    failed = GateReport(dtype="F32")
    check_processor_files(failed, tampered, base)
    assert not failed.passed and "differs" in failed.checks[0].detail
    (tampered / name).unlink()
    missing = GateReport(dtype="F32")
    check_processor_files(missing, tampered, base)
    assert not missing.passed and "missing" in missing.checks[0].detail
    _, plain = arch_zoo.release("llama")
    assert not [c for c in plain["checks"] if c["name"] == "processor files as the source"]


def _end_to_end(case_id: str, arch_zoo: ArchZoo, candidate: Path, processor: Path | None):
    """The gate's end-to-end check alone, of `candidate` against PeftModel on the case's base."""
    from mergekit_lite.gate.endtoend import EndToEnd, Placement, check_end_to_end
    from mergekit_lite.gate.report import GateReport
    from mergekit_lite.gate.tolerances import thresholds
    from mergekit_lite.sources.tokenizer import load_tokenizer

    case = CASES_BY_ID[case_id]
    base = arch_zoo.base(case.arch)
    check = EndToEnd(
        candidate=candidate,
        base=base,
        adapters=[(arch_zoo.adapter(case_id), 1.0)],
        placement=Placement(),
        tokenizer=load_tokenizer(base),
        prompts=None,
        new_tokens=4,
        limits=thresholds("F32"),
        model_class=ARCHES[case.arch].model_class,
        processor=processor,
    )
    report = GateReport(dtype="F32")
    check_end_to_end(report, check)
    return report


@pytest.mark.parametrize("arch", sorted(VISION_TOWER))
def test_a_release_without_its_vision_lora_fails_on_the_image_prompt(
    arch: str, arch_zoo: ArchZoo, tmp_path: Path
) -> None:
    """The release of a vision-tower LoRA with that LoRA dropped (the base's tensors shipped under
    the release's files) fails the end-to-end check, on the image prompt, while the same check on the
    text prompts alone passes it (what the gate did before the image prompt); the release itself
    passes both (control)."""
    import shutil

    case_id = f"{arch}-vision"
    out, _ = arch_zoo.release(case_id)
    base = arch_zoo.base(arch)
    dropped = tmp_path / "dropped"
    shutil.copytree(out, dropped)
    shutil.copyfile(base / "model.safetensors", dropped / "model.safetensors")

    failed = _end_to_end(case_id, arch_zoo, dropped, base)
    assert not failed.passed
    [row] = [c for c in failed.checks if c.name == "max_abs_logit_diff"]
    assert not row.passed and row.detail.startswith("worst: prompt 4 (the image prompt)"), row.detail
    assert failed.context["image_prompt"]["used"]

    text_only = _end_to_end(case_id, arch_zoo, dropped, None)
    assert text_only.passed, [(c.name, c.figure, c.detail) for c in text_only.checks if not c.passed]
    assert text_only.context["adapter_effect_max_abs_logit_diff"] == 0
    assert len(text_only.context["modules_not_reached"]) >= 3

    assert _end_to_end(case_id, arch_zoo, out, base).passed


def test_the_image_prompt_is_on_the_model_card_and_runs_whole_models(arch_zoo: ArchZoo, tmp_path: Path) -> None:
    """The model card's gate table says the image prompt ran (the logit row names it and the image);
    layer by layer asked for, a vision-language base runs whole models, saying why, with the image
    prompt (the layered runner takes token ids only)."""
    from mergekit_lite.gate.images import IMAGE_SHA256

    out, _ = arch_zoo.release("llava-vision")
    card = (out / "README.md").read_text()
    [row] = [line for line in card.splitlines() if "max_abs_logit_diff" in line]
    assert "image prompt (prompt 4)" in row and IMAGE_SHA256[:12] in row and "LlavaProcessor" in row

    manifest = write_manifest(
        tmp_path,
        arch_zoo.base("llava"),
        [arch_zoo.adapter("llava-vision")],
        "float32",
        verify={"max_new_tokens": 2, "layer_by_layer": True},
    )
    report = execute(prepare(manifest)).report.to_dict()
    assert report["passed"]
    assert report["context"]["runner"].startswith("whole models: layer by layer was wanted, but")
    assert report["context"]["image_prompt"]["used"]


def test_the_synthetic_image_is_fixed() -> None:
    """The same bytes on every run (its digest is pinned here), so a report's figures reproduce."""
    from mergekit_lite.gate.images import IMAGE_SHA256, synthetic_image

    image = synthetic_image()
    assert image.shape == (32, 32, 3) and str(image.dtype) == "uint8"
    assert IMAGE_SHA256 == "631069a8602a3879d5afb52724f0a512878a201a59dc697e3935e796e5f4f24d"
    assert len({tuple(p) for p in image.reshape(-1, 3).tolist()}) > 100  # not a flat colour


@pytest.mark.parametrize(
    ("arch", "made_by"),
    [
        ("llava", "through LlavaProcessor, with its chat template; 16 image tokens"),
        ("gemma3", "through Gemma3Processor, with its chat template; 4 image tokens"),
        ("qwen2_vl", "through Qwen2VLImageProcessorPil (AutoProcessor: ImportError: Qwen2VLVideoProcessor requires"),
        ("qwen2_5_vl", "through Qwen2VLImageProcessorPil (AutoProcessor: ImportError: Qwen2VLVideoProcessor"),
        ("mistral3", "through PixtralImageProcessorPil (AutoProcessor: ImportError: PixtralProcessor requires"),
    ],
)
def test_the_image_prompt_says_how_it_was_made(arch: str, made_by: str, arch_zoo: ArchZoo) -> None:
    """AutoProcessor and its chat template where it loads; else the image processor alone, saying why."""
    import importlib.util

    if "AutoProcessor:" in made_by and importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: AutoProcessor loads this processor")
    _, report = arch_zoo.release(f"{arch}-vision")
    assert made_by in report["context"]["image_prompt"]["how"], report["context"]["image_prompt"]
