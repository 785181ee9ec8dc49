"""Every architecture of tests/architectures.py, merged through the whole pipeline and its gate.

Each case: the float32 release's logits (class logits for a classification head, decoder logits
over the encoded prompt for an encoder-decoder) equal the unmerged PeftModel's within 1e-5
relative; the gate passed; and the base without the adapter fails that same comparison (the
negative control: the adapter really changes the model, and the comparison can fail).
"""

from __future__ import annotations

import json
import warnings
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
    Case,
    build_adapter,
    build_base,
    readme_section,
    readme_table,
)
from helpers import write_manifest

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
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": torch.randint(*PROMPT_IDS, (2, 5), generator=gen)}
    return {"input_ids": ids}


def _logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.to(torch.float64)


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
    inputs = _inputs(merged)
    ref = _logits(reference, inputs)
    ours = _logits(merged, inputs)
    assert ours.shape == ref.shape
    diff = float((ours - ref).abs().max())
    assert _close(ours, ref), f"release vs unmerged PeftModel: max |diff| {diff:.3g}, max |ref| {ref.abs().max():.3g}"
    with reference.disable_adapter():
        base = _logits(reference, inputs)
    assert not _close(base, ref), "negative control: the base without the adapter matches base + adapter"

    # the release keeps the base's on-disk names: a drop-in replacement for it
    base_index = _tensor_names(arch_zoo.base(case.arch))
    assert _tensor_names(out) - base_index <= {"lm_head.weight", "language_model.lm_head.weight"}
    assert base_index <= _tensor_names(out)


def _tensor_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names |= set(f.keys())
    return names


def test_modules_the_prompts_do_not_reach_are_named(arch_zoo: ArchZoo) -> None:
    """Text prompts never run a vision tower: the report names its changed modules as covered by
    the algebra check only; a vision-only adapter passes on the dtype's threshold (not on 0 <= 0)
    and says that it changes none of the logits; a language-only adapter reports none (control)."""
    _, mixed = arch_zoo.release("llava")
    unreached = mixed["context"].get("modules_not_reached", [])
    assert unreached and all("vision" in m or "projector" in m for m in unreached), unreached
    assert "only the per-tensor algebra check covers them" in _detail(mixed, "max_abs_logit_diff")

    vision = Case("llava-vision", "llava", {"target_modules": r".*vision_tower.*\.(q_proj|v_proj)"})
    _, report = arch_zoo.release(vision)
    assert report["passed"]
    assert len(report["context"]["modules_not_reached"]) == 2  # q_proj and v_proj of its one layer
    assert "the adapters change none of these logits" in _detail(report, "max_abs_logit_diff")
    assert report["context"]["adapter_effect_max_abs_logit_diff"] == 0
    assert next(c for c in report["checks"] if c["name"] == "max_abs_logit_diff")["threshold"] > 0

    _, language = arch_zoo.release("llava-language")
    assert "modules_not_reached" not in language["context"]
    assert "never ran" not in _detail(language, "max_abs_logit_diff")


def _detail(report: dict, name: str) -> str:
    return next(c["detail"] for c in report["checks"] if c["name"] == name)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_lora_on_fused_experts_is_refused_naming_the_feature(arch: str, arch_zoo: ArchZoo, tmp_path: Path) -> None:
    """PEFT 0.21 makes all-linear on these target_parameters of the fused experts: refused, nothing written."""
    case = Case(f"{arch}-all-linear", arch, {"target_modules": "all-linear"})
    adapter = build_adapter(case, arch_zoo.base(arch), tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    manifest = write_manifest(tmp_path, arch_zoo.base(arch), [adapter], "float32")
    with pytest.raises(MergekitError, match="`target_parameters` is set"):
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
    """The base's preprocessor_config.json ships byte for byte, and the gate checks it: a release
    whose copy differs or is missing fails the check (negative controls); a base without one gets
    no such check."""
    import shutil

    from mergekit_lite.gate.packaging import check_processor_files
    from mergekit_lite.gate.report import GateReport

    base = arch_zoo.base("llava")
    out, report = arch_zoo.release("llava")
    name = "preprocessor_config.json"
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
