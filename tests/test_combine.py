"""`combine:`: PEFT's add_weighted_adapter methods, with parity to PEFT for every method.

The oracle is PEFT itself: `add_weighted_adapter(...)` (after `torch.manual_seed(seed)` for the
random methods), then `merge_and_unload()` of the new adapter. Every equality check has a negative
control: the same PEFT call with another density, seed, method or weight must NOT match, nor must
the unmerged base.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.errors import ManifestError, PlanError
from mergekit_lite.manifest.load import load_manifest
from mergekit_lite.merge.combine import CombinedFactors
from mergekit_lite.pipeline import execute, prepare, verify_release

from builders import _simple, load_base
from helpers import (
    DTYPES,
    SLACK,
    attach_adapters,
    half_ulps,
    load_output,
    merged_state_dict,
    violations,
    write_manifest,
)


def _lora(name: str) -> bool:
    return ".lora_" in name  # every factor perturbed, so that each adapter really changes the model


# Adapters of the tests: llama ones with an embedding LoRA, GPT-2 ones on Conv1D (fan_in_fan_out);
# the first adapter's init_lora_weights (True, gaussian, False) decides PEFT's random draws for dare.
RECIPES = {
    "l1": _simple(
        "llama",
        61,
        perturb=(_lora, 0.2),
        r=4,
        lora_alpha=8,
        init_lora_weights=True,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    ),
    "l2": _simple(
        "llama",
        62,
        perturb=(_lora, 0.2),
        r=4,
        lora_alpha=4,
        init_lora_weights="gaussian",
        target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens"],
    ),
    "l3": _simple("llama", 63, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "g1": _simple(
        "gpt2",
        64,
        perturb=(_lora, 0.2),
        r=4,
        lora_alpha=8,
        use_rslora=True,
        fan_in_fan_out=True,
        init_lora_weights=True,
        target_modules=["c_attn", "c_fc"],
    ),
    "g2": _simple("gpt2", 65, r=4, lora_alpha=16, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]),
    "lre": _simple("llama", 66, r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj)"),
}


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    adapters: tuple[tuple[str, float], ...]
    combine: dict[str, Any]
    control: dict[str, Any]  # another combine (or `weights`) whose result must differ

    def variant(self, name: str) -> tuple[dict[str, Any], list[float]]:
        weights = [w for _, w in self.adapters]
        if name == "main":
            return self.combine, weights
        control = dict(self.control)
        return control, control.pop("weights", None) or weights


CASES = [
    Case("cat", "llama", (("l1", 1.0), ("l2", -0.7), ("l3", 0.5)), {"method": "cat"}, {"method": "svd", "svd_rank": 4}),
    Case("linear", "llama", (("l2", 0.8), ("l1", -1.3)), {"method": "linear"}, {"method": "sum"}),
    Case(
        "svd",
        "llama",
        (("l1", 1.0), ("l2", 0.6), ("l3", 0.5)),
        {"method": "svd", "svd_rank": 6, "svd_clamp": 0.95},
        {"method": "svd", "svd_rank": 6},
    ),
    Case(
        "svd-reduced",
        "gpt2",
        (("g1", 1.0), ("g2", 0.7)),
        {"method": "svd", "svd_full_matrices": False},
        {"method": "svd", "svd_rank": 2},
    ),
    Case(
        "ties",
        "llama",
        (("l1", 1.0), ("l2", 0.9)),
        {"method": "ties", "density": 0.5, "majority_sign_method": "frequency"},
        {"method": "ties", "density": 0.7, "majority_sign_method": "frequency"},
    ),
    Case(
        "ties_svd",
        "gpt2",
        (("g2", 1.0), ("g1", 0.6)),
        {"method": "ties_svd", "density": 0.7},
        {"method": "ties_svd", "density": 0.4},
    ),
    Case(
        "dare_linear",
        "llama",
        (("l1", 1.0), ("l2", 0.8)),
        {"method": "dare_linear", "density": 0.5, "seed": 3},
        {"method": "dare_linear", "density": 0.5, "seed": 4},
    ),
    Case(
        "dare_ties",
        "gpt2",
        (("g1", 1.0), ("g2", -0.5)),
        {"method": "dare_ties", "density": 0.6, "seed": 11},
        {"method": "dare_ties", "density": 0.6, "seed": 12},
    ),
    Case(
        "dare_linear_svd",
        "llama",
        (("l2", 1.0), ("l1", 0.7)),
        {"method": "dare_linear_svd", "density": 0.5},
        {"method": "dare_linear_svd", "density": 0.5, "seed": 1},
    ),
    Case(
        "dare_ties_svd",
        "gpt2",
        (("g2", 1.0), ("g1", 1.0)),
        {"method": "dare_ties_svd", "density": 0.5, "seed": 7},
        {"method": "dare_ties_svd", "density": 0.8, "seed": 7},
    ),
    Case(
        "magnitude_prune",
        "llama",
        (("l1", 1.0), ("l2", 1.0)),
        {"method": "magnitude_prune", "density": 0.3},
        {"method": "magnitude_prune", "density": 0.6},
    ),
    Case(
        "magnitude_prune_svd",
        "gpt2",
        (("g1", 0.9), ("g2", 1.0)),
        {"method": "magnitude_prune_svd", "density": 0.4},
        {"method": "ties_svd", "density": 0.4},
    ),
    Case(
        "single",
        "llama",
        (("l1", 0.8),),
        {"method": "ties", "density": 0.5},
        {"method": "ties", "density": 0.5, "weights": [0.5]},
    ),
]
BY_ID = {c.id: c for c in CASES}
CASE_IDS = [c.id for c in CASES]
DTYPE_NAMES = ["float32", "bfloat16"]


def _base_kind(case: Case, dtype_name: str) -> str:
    return case.base if dtype_name == "float32" else f"{case.base}_bf16"


def write_combine_manifest(
    folder: Path,
    base: Path,
    adapters: list[tuple[Path, float]],
    dtype: str,
    combine: dict[str, Any] | str | None,
    verify: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """A manifest of `adapters` combined by `combine` (inputs by absolute path; the gate off unless `verify`)."""
    return write_manifest(
        folder,
        base,
        adapters,
        dtype,
        absolute=True,
        **extra,
        combine=combine,
        verify=verify if verify is not None else {"enabled": False},
    )


class Env:
    """The tests' adapters, merges and PEFT references, each built once per module."""

    def __init__(self, zoo, root: Path) -> None:
        self.zoo, self.root = zoo, root
        self._adapters: dict[str, Path] = {}
        self._merges: dict[tuple[str, str], Any] = {}
        self._peft: dict[tuple[str, str, str], tuple[dict, dict]] = {}

    def adapter(self, name: str) -> Path:
        if name not in self._adapters:
            recipe = RECIPES[name]
            out = self.root / "adapters" / name
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                recipe.build(self.zoo.base(recipe.base), out)
            self._adapters[name] = out
        return self._adapters[name]

    def inputs(self, case: Case, weights: list[float] | None = None) -> list[tuple[Path, float]]:
        weights = weights or [w for _, w in case.adapters]
        return [(self.adapter(name), w) for (name, _), w in zip(case.adapters, weights)]

    def manifest(self, case: Case, dtype_name: str, variant: str = "main", verify: bool = False) -> Path:
        combine, weights = case.variant(variant)
        folder = self.root / "merges" / f"{case.id}-{dtype_name}-{variant}"
        return write_combine_manifest(
            folder,
            self.zoo.base(_base_kind(case, dtype_name)),
            self.inputs(case, weights),
            dtype_name,
            combine,
            {"max_new_tokens": 4} if verify else None,
        )

    def merge(self, case: Case, dtype_name: str):
        """Our release of the case (float32 with the gate on); the pipeline's Result."""
        key = (case.id, dtype_name)
        if key not in self._merges:
            m = self.manifest(case, dtype_name, verify=dtype_name == "float32")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._merges[key] = execute(prepare(m), verify=dtype_name == "float32")
        return self._merges[key]

    def peft(self, case: Case, dtype_name: str, variant: str = "main") -> tuple[dict, dict]:
        """PEFT's combined factors {module: (A, B, scaling)} and merged state dict for a variant."""
        key = (case.id, dtype_name, variant)
        if key not in self._peft:
            combine, weights = case.variant(variant)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._peft[key] = peft_combine(
                    self.zoo.base(_base_kind(case, dtype_name)), self.inputs(case, weights), DTYPES[dtype_name], combine
                )
        return self._peft[key]


def peft_combine(
    base: Path, adapters: list[tuple[Path, float]], dtype: torch.dtype, combine: dict[str, Any]
) -> tuple[dict, dict]:
    """PEFT's add_weighted_adapter (seeded) and merge_and_unload; `sum`: PEFT's merge of all adapters."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = load_base(base, dtype=dtype)
    if combine["method"] == "sum":
        peft_model, names = attach_adapters(model, adapters)
        return {}, merged_state_dict(peft_model, names)
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name=names[0])
    for name, (path, _) in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    kwargs = {k: v for k, v in combine.items() if k not in ("method", "seed")}
    torch.manual_seed(combine.get("seed", 0))
    peft_model.add_weighted_adapter(names, [w for _, w in adapters], "c", combination_type=combine["method"], **kwargs)
    factors = {}
    for module_name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "c" in module.lora_A:
            factors[module_name] = (
                module.lora_A["c"].weight.detach().clone(),
                module.lora_B["c"].weight.detach().clone(),
                module.scaling["c"],
            )
        elif isinstance(module, LoraLayer) and "c" in module.lora_embedding_A:
            factors[module_name] = (
                module.lora_embedding_A["c"].detach().clone(),
                module.lora_embedding_B["c"].detach().clone(),
                module.scaling["c"],
            )
    peft_model.set_adapter("c")
    merged = peft_model.merge_and_unload()
    return factors, {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def env(zoo, tmp_path_factory) -> Env:
    return Env(zoo, tmp_path_factory.mktemp("combine"))


def our_factors(
    env: Env, case: Case, dtype_name: str = "float32"
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The combined factors as the merge computes them, by module, in the plan's (PEFT's) order."""
    job = prepare(env.manifest(case, dtype_name), for_output=False)
    combined = CombinedFactors(job.plan.combine, job.adapters)
    try:
        return {m.module: (*combined.factors(m), m.scaling) for m in job.plan.combine.modules}
    finally:
        combined.close()


def layouts(env: Env, case: Case) -> dict[str, tuple[str, str]]:
    """Per combined module: the output tensor it changes and its layout."""
    plan = prepare(env.manifest(case, "float32"), for_output=False).plan
    return {m.module: (m.target, m.layout) for m in plan.combine.modules}


def _oriented(product: torch.Tensor, layout: str) -> torch.Tensor:
    """B @ A ([out, in]) in the weight's layout: [in, out] for Conv1D, [vocab, dim] for an embedding."""
    return product.T if layout in ("conv1d", "embedding") else product


def _differs(ours: dict, theirs: dict) -> bool:
    return any(
        not (torch.equal(ours[k][0], theirs[k][0]) and torch.equal(ours[k][1], theirs[k][1]))
        for k in ours
        if k in theirs
    ) or set(ours) != set(theirs)


# --------------------------------------------------------------------------- parity with PEFT


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_combined_factors_equal_peft_bit_for_bit(env: Env, case_id: str) -> None:
    """Each module's combined (A, B) and scaling are PEFT's exactly, modules in PEFT's order."""
    case = BY_ID[case_id]
    ours = our_factors(env, case)
    theirs, _ = env.peft(case, "float32")
    assert list(ours) == list(theirs), "the combined adapter's modules (or their order) differ from PEFT's"
    for module, (a, b, scaling) in ours.items():
        ref_a, ref_b, ref_scaling = theirs[module]
        assert a.shape == ref_a.shape and b.shape == ref_b.shape, module
        assert torch.equal(a, ref_a) and torch.equal(b, ref_b), f"{module}: combined factors differ from PEFT's"
        assert scaling == ref_scaling, module
    # negative control: PEFT with another density, seed, method or weight gives other factors
    control, _ = env.peft(case, "float32", "control")
    if control:
        assert _differs(ours, control), f"negative control: {case.control} gives the same factors"


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_merged_tensors_match_peft(env: Env, case_id: str, dtype_name: str) -> None:
    """The release equals PEFT's add_weighted_adapter + merge_and_unload: float32 within a few ulp,
    bfloat16 within one ulp (of the larger of the weight and PEFT's delta, which PEFT rounds)."""
    case = BY_ID[case_id]
    dtype = DTYPES[dtype_name]
    ours = load_output(env.merge(case, dtype_name).output)
    _, ref = env.peft(case, dtype_name)
    assert set(ours) <= set(ref), f"unexpected tensors {sorted(set(ours) - set(ref))}"
    ref = {k: ref[k] for k in ours}
    assert all(v.dtype == dtype for v in ours.values())
    base = {k: v.to(dtype) for k, v in load_output(env.zoo.base(_base_kind(case, dtype_name))).items()}
    _, ref32 = env.peft(case, "float32")
    base32 = load_output(env.zoo.base(case.base))
    mags = {k: torch.maximum(base[k].float().abs(), (ref32[k] - base32[k]).abs()) for k in base if k in ref32}
    factors, _ = env.peft(case, dtype_name)
    where = layouts(env, case)
    for module, (a, b, scaling) in factors.items():
        if a.dtype == dtype:
            # PEFT keeps `cat`'s combined factors in the weights' dtype: it rounds A and B (half an ulp
            # of each term of s |B| |A| each), then the delta, then the sum; the magnitude it rounds
            # through is twice s |B| |A| (ours rounds once, and is never the farther from exact, below)
            target, layout = where[module]
            through = 2 * scaling * (b.float().abs() @ a.float().abs())
            mags[target] = torch.maximum(mags[target], _oriented(through, layout))
    found = violations(ours, ref, mags, dtype)
    assert not found, f"{len(found)} tensors beyond the {dtype_name} tolerance of PEFT:\n" + "\n".join(
        map(str, found[:5])
    )
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert changed, "negative control: the combination changes no tensor"
    assert violations({k: base[k] for k in changed}, {k: ref[k] for k in changed}, mags, dtype), (
        "negative control: the unmerged base passes the comparison"
    )
    _, control = env.peft(case, dtype_name, "control")
    assert violations(ours, {k: control[k] for k in ours}, mags, dtype), (
        f"negative control: PEFT with {case.control} matches too"
    )
    if dtype_name != "float32":  # rounding once is never farther from the exact result than PEFT
        exact = _exact(base, our_factors(env, case), where)
        for k, truth in exact.items():
            ours_err = float((ours[k].double() - truth).abs().mean())
            peft_err = float((ref[k].double() - truth).abs().mean())
            assert ours_err <= peft_err * (1 + 1e-9), f"{k}: mean error {ours_err:.3g} > PEFT's {peft_err:.3g}"


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_final_add_is_correctly_rounded(env: Env, case_id: str, dtype_name: str) -> None:
    """The combined factors are PEFT's; the add of their delta is rounded once: every element of a
    changed tensor within half an ulp of W + s B A evaluated here in float64. PEFT's own float32
    merge, which rounds B @ A, the scaling and the add, is beyond it (negative control)."""
    case = BY_ID[case_id]
    dtype = DTYPES[dtype_name]
    ours = load_output(env.merge(case, dtype_name).output)
    base = load_output(env.zoo.base(_base_kind(case, dtype_name)))
    plan = prepare(env.manifest(case, dtype_name), for_output=False).plan
    saved = load_output(env.zoo.base(case.base))  # the float32 base the adapters were made on
    for t in plan.tensors:
        if t.ops and t.ops[0].kind == "base_layer":  # the merge starts from the adapter's saved copy of it
            base[t.name] = saved[t.name]
    exact = _exact(base, our_factors(env, case, dtype_name), layouts(env, case))
    assert exact, "negative control: the combination changes no tensor"
    worst = max(float(half_ulps(ours[k], truth, dtype).max()) for k, truth in exact.items())
    assert worst <= SLACK, f"an element is {worst:.3f} half ulps from the exact merge"
    if dtype_name == "float32":
        _, ref = env.peft(case, dtype_name)
        theirs = max(float(half_ulps(ref[k], truth, dtype).max()) for k, truth in exact.items())
        assert theirs > SLACK, f"negative control: PEFT's float32 merge is within half an ulp ({theirs:.3f})"


def _exact(base: dict[str, torch.Tensor], factors: dict, where: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """W + s B A in float64, from the base as stored and the combined factors."""
    exact = {}
    for module, (a, b, scaling) in factors.items():
        target, layout = where[module]
        exact[target] = base[target].double() + _oriented(scaling * (b.double() @ a.double()), layout)
    return exact


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_gate_passes_against_peft_add_weighted_adapter(env: Env, case_id: str) -> None:
    """The gate's algebra (combined factors) and end-to-end (PEFT's add_weighted_adapter) checks pass."""
    result = env.merge(BY_ID[case_id], "float32")
    report = result.report
    assert report is not None and report.passed, [str(c) for c in report.failures]
    figures = {c.name: c.figure for c in report.checks if c.group == "end_to_end"}
    assert figures["max_abs_logit_diff"] < 1e-4 and figures["top1_agreement"] == 1.0
    assert any(c.group == "algebra" and "changed tensors" in c.name for c in report.checks)


@pytest.mark.parametrize("case_id", ["linear", "ties", "dare_ties"])
def test_gate_fails_a_release_made_with_other_combine_settings(env: Env, case_id: str) -> None:
    """Negative control of the gate: the release checked against the control settings fails."""
    case = BY_ID[case_id]
    release = env.merge(case, "float32").output
    control = env.manifest(case, "float32", "control", verify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = verify_release(control, against=release)
    assert not report.passed
    assert {c.group for c in report.failures} & {"algebra", "end_to_end"}


@pytest.mark.parametrize("case_id", ["dare_linear"])
def test_worker_processes_write_the_same_bytes(env: Env, tmp_path: Path, case_id: str) -> None:
    """Each worker process computes the combination itself (dare: all of it, in PEFT's order): the
    shards are byte-identical to the local executor's."""
    case = BY_ID[case_id]
    base, inputs = env.zoo.base(case.base), env.inputs(case)
    outputs = []
    for executor in ("local", {"kind": "processes", "workers": 2}):
        folder = tmp_path / (executor if isinstance(executor, str) else "processes")
        m = write_combine_manifest(
            folder,
            base,
            inputs,
            "float32",
            case.combine,
            executor=executor,
            output={"path": "./out", "max_shard_size": "24KB"},
        )
        outputs.append(execute(prepare(m), verify=False).output)
    shards = sorted(p.name for p in outputs[0].glob("*.safetensors"))
    assert len(shards) > 2 and shards == sorted(p.name for p in outputs[1].glob("*.safetensors"))
    for name in shards:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def test_receipt_and_card_name_the_method(env: Env) -> None:
    case = BY_ID["dare_ties"]
    out = env.merge(case, "float32").output
    receipt = json.loads((out / "release.json").read_text())
    assert receipt["plan"]["combine"] == {
        "method": "dare_ties",
        "rank": 4,
        "density": 0.6,
        "majority_sign_method": "total",
        "seed": 11,
    }
    card = (out / "README.md").read_text()
    assert "adapters combined: `dare_ties` (rank=4, density=0.6, majority_sign_method=total, seed=11)" in card
    resolved = load_manifest(out / "manifest.yaml").manifest.combine
    assert (resolved.method, resolved.density, resolved.seed) == ("dare_ties", 0.6, 11)
    single = json.loads((env.merge(BY_ID["single"], "float32").output / "release.json").read_text())
    assert single["plan"]["combine"]["effective_method"] == "linear"  # PEFT's rule for one adapter


# --------------------------------------------------------------------------- the plan


def test_plan_reads_no_tensor_data_and_folds_each_module(env: Env, monkeypatch) -> None:
    import mergekit_lite.io.reader as reader

    def forbidden(*args, **kwargs):
        raise AssertionError("the plan read tensor data")

    for name in ("get", "load", "raw_chunks"):
        monkeypatch.setattr(reader.TensorReader, name, forbidden)
    monkeypatch.setattr(reader, "safe_open", forbidden)
    case = BY_ID["cat"]
    plan = prepare(env.manifest(case, "float32"), for_output=False).plan
    combine = plan.combine
    assert combine is not None and combine.index == 3 and combine.rank == 4 + 4 + 8
    changed = [t for t in plan.tensors if t.ops]
    assert len(changed) == len(combine.modules) == 9  # embedding, q, k, v, down_proj in two layers
    for t in changed:  # (PEFT's saved copies of a targeted embedding stay, as checks against the base)
        assert [(op.kind, op.adapter) for op in t.ops if op.kind != "base_layer"] == [("delta", 3)], t.name
    assert pickle.loads(pickle.dumps(plan)).combine == combine  # plain data, for the executors
    assert json.loads(json.dumps(plan.to_dict()))["combine"]["method"] == "cat"


def test_cli_plan_names_the_combined_adapter(env: Env, tmp_path: Path) -> None:
    case = BY_ID["ties"]
    m = write_combine_manifest(tmp_path, env.zoo.base("llama"), env.inputs(case), "float32", case.combine)
    result = CliRunner().invoke(main, ["plan", str(m)])
    assert result.exit_code == 0, result.output
    assert (
        "adapter 2 = `ties` of the adapters above (rank=4, density=0.5, majority_sign_method=frequency), "
        "as PEFT's add_weighted_adapter"
    ) in result.output
    assert "a2 lora x1" in result.output


def test_dare_holds_its_factors_and_leaves_torch_rng_alone(env: Env) -> None:
    state = torch.random.get_rng_state()
    dare = prepare(env.manifest(BY_ID["dare_linear"], "float32"), for_output=False)
    ties = prepare(env.manifest(BY_ID["ties"], "float32"), for_output=False)
    assert dare.plan.combine.held_bytes() > 0 and ties.plan.combine.held_bytes() == 0
    combined = CombinedFactors(dare.plan.combine, dare.adapters)
    combined.factors(dare.plan.combine.modules[-1])
    assert torch.equal(state, torch.random.get_rng_state()), "planning or combining touched torch's global RNG"


# --------------------------------------------------------------------------- refusals


REFUSALS = [
    pytest.param(
        ["l1", "l3"],
        "linear",
        "llama",
        "`combine: linear` needs adapters of one rank",
        "All adapters must have the same r value",
        id="ranks-differ",
    ),
    pytest.param(
        ["l1", "lre"],
        {"method": "ties", "density": 0.5},
        "llama",
        "mix lists and regular expressions",
        "same target modules type",
        id="target-types-mixed",
    ),
    pytest.param(
        ["l1", "l2"],
        {"method": "svd", "svd_rank": 40},
        "llama",
        "rank 40 is larger than `model.embed_tokens` allows (32x96)",
        None,
        id="svd-rank-too-large",
    ),
    pytest.param(["@llama_dora", "l1"], "cat", "llama", "`use_dora` is set", None, id="dora"),
    pytest.param(["l1", "@llama_mts_lm_head"], "cat", "llama", "`modules_to_save` is set", None, id="modules-to-save"),
    pytest.param(
        ["@llama_tt_list", "l1"], "cat", "llama", "`trainable_token_indices` is set", None, id="trainable-tokens"
    ),
    pytest.param(["@qwen2_lora_bias"], "cat", "qwen2", "`lora_bias` is set", None, id="lora-bias"),
    pytest.param(["@qwen2_bias_all"], "svd", "qwen2", "outside its LoRA factors (replace)", None, id="bias-all"),
    pytest.param(
        ["@llama_layers_to_transform", "l3"],
        "linear",
        "llama",
        "PEFT's add_weighted_adapter would drop its factors for `model.layers.0.self_attn.q_proj`",
        None,
        id="first-adapter-narrower",
    ),
]


@pytest.mark.parametrize("names,combine,base,message,peft_message", REFUSALS)
def test_refused_at_plan_time(env: Env, tmp_path: Path, names, combine, base, message, peft_message) -> None:
    """Refused in the plan, exit 2, with a reason; where PEFT itself refuses, it does too."""
    adapters = [(env.zoo.adapter(n[1:]) if n.startswith("@") else env.adapter(n), 1.0) for n in names]
    m = write_combine_manifest(tmp_path, env.zoo.base(base), adapters, "float32", combine)
    with pytest.raises(PlanError) as caught:
        prepare(m, for_output=False)
    assert message in str(caught.value)
    assert PlanError.exit_code == 2
    if peft_message is not None:
        spec = {"method": combine} if isinstance(combine, str) else combine
        with warnings.catch_warnings(), pytest.raises(ValueError, match=peft_message):
            warnings.simplefilter("ignore")
            peft_combine(env.zoo.base(base), adapters, torch.float32, spec)


def test_cli_refusal_is_one_line_and_exit_2(env: Env, tmp_path: Path) -> None:
    m = write_combine_manifest(
        tmp_path, env.zoo.base("llama"), [(env.adapter("l1"), 1.0), (env.adapter("l3"), 1.0)], "float32", "ties"
    )
    result = CliRunner().invoke(main, ["plan", str(m)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: manifest.yaml:") and "needs `density`" in lines[0], lines


MANIFEST_ERRORS = [
    pytest.param(
        "combine: ties\n",
        "manifest.yaml:4: `combine`: Value error, `ties` needs `density`, the share of values kept (0 < density <= 1)",
        id="density-missing",
    ),
    pytest.param(
        "combine: {method: cat, density: 0.5}\n",
        "`density` goes with ties, ties_svd, dare_linear, "
        "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd; `cat` does not use it",
        id="parameter-unused",
    ),
    pytest.param(
        "combine: {method: ties, density: 0.5, seed: 1}\n",
        "`seed` goes with dare_linear, dare_ties, dare_linear_svd, dare_ties_svd; `ties` does not use it",
        id="seed-without-dare",
    ),
    pytest.param(
        "combine: {method: svd, svd_rank: 0}\n",
        "`combine.svd_rank`: Input should be greater than or equal to 1",
        id="svd-rank",
    ),
    pytest.param(
        "combine: {method: dare_ties, density: 1.5}\n",
        "`combine.density`: Input should be less than or equal to 1",
        id="density-range",
    ),
    pytest.param("combine: {methd: cat}\n", "unknown key `combine.methd`; did you mean `method`?", id="misspelt"),
    pytest.param("combine: average\n", "`combine.method`: Input should be 'sum', 'cat', 'linear'", id="bad-method"),
]


@pytest.mark.parametrize("text,message", MANIFEST_ERRORS)
def test_manifest_refuses(tmp_path: Path, text: str, message: str) -> None:
    m = tmp_path / "manifest.yaml"
    m.write_text("base: ./b\nadapters: [./a]\noutput: ./o\n" + text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(m)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "text,expected",
    [
        pytest.param("", {"method": "sum"}, id="default"),
        pytest.param("combine: cat\n", {"method": "cat"}, id="short-form"),
        pytest.param(
            "combine: {method: dare_ties, density: 0.5, seed: 3, majority_sign_method: frequency}\n",
            {"method": "dare_ties", "density": 0.5, "seed": 3, "majority_sign_method": "frequency"},
            id="mapping",
        ),
    ],
)
def test_manifest_accepts(tmp_path: Path, text: str, expected: dict[str, Any]) -> None:
    m = tmp_path / "manifest.yaml"
    m.write_text("base: ./b\nadapters: [./a]\noutput: ./o\n" + text)
    assert load_manifest(m).manifest.combine.model_dump(exclude_none=True) == expected


def test_schema_documents_that_linear_is_not_the_sum() -> None:
    result = CliRunner().invoke(main, ["schema"])
    schema = json.loads(result.output)
    text = schema["$defs"]["CombineSpec"]["description"]
    assert "NOT the sum of the deltas" in text and "`sum`" in text
