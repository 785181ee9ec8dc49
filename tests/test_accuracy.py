"""bfloat16 accuracy: our single rounding is never farther from the exact merge than PEFT.

Both sides get the same input, a bfloat16 copy of the base, so that the comparison measures
the merge and not the rounding of the base. The truth is W + sum_i w_i s_i B_i A_i in float64,
computed from the adapters' saved float32 factors, with W either the bfloat16 input (the exact
answer to the question both tools were asked) or the original float32 base.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from builders import load_base
from helpers import attach_adapters, load_folder_tensors, load_output, merged_state_dict

# plain LoRA, two weighted adapters, and an embedding LoRA (PEFT rounds an embedding delta to the
# weight dtype before adding it: two roundings even for one adapter)
ACCURACY_CASES = ["lora", "two_weighted", "embedding_lora"]
PREFIX = "base_model.model."


def exact_merge(base: dict[str, torch.Tensor], adapters) -> dict[str, torch.Tensor]:
    """Float64 W + sum w s B A for the plain-LoRA adapters of these cases (changed tensors only);
    embeddings: W + sum w s (B_e A_e)^T."""
    truth: dict[str, torch.Tensor] = {}
    for path, weight in adapters:
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        assert not (
            config["use_rslora"]
            or config["use_dora"]
            or config["fan_in_fan_out"]
            or config["rank_pattern"]
            or config["alpha_pattern"]
        ), "plain LoRA expected"
        scale = config["lora_alpha"] / config["r"]
        factors = load_file(path / "adapter_model.safetensors")
        for key in factors:
            if key.endswith(".lora_A.weight"):
                module = key[len(PREFIX) : -len(".lora_A.weight")]
                a = factors[key].to(torch.float64)
                delta = factors[key.replace(".lora_A.", ".lora_B.")].to(torch.float64) @ a
            elif key.endswith(".lora_embedding_A"):
                module = key[len(PREFIX) : -len(".lora_embedding_A")]
                a = factors[key].to(torch.float64)
                delta = (factors[key.replace("_A", "_B")].to(torch.float64) @ a).T
            else:
                assert key.endswith((".lora_B.weight", ".lora_embedding_B", ".base_layer.weight")), key
                continue
            name = f"{module}.weight"
            if name not in truth:
                truth[name] = base[name].to(torch.float64).clone()
            truth[name] += weight * scale * delta
    return truth


def mean_errors(values: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
    per_tensor = {k: float((values[k].to(torch.float64) - t).abs().mean()) for k, t in truth.items()}
    total = sum(float((values[k].to(torch.float64) - t).abs().sum()) for k, t in truth.items())
    return per_tensor, total / sum(t.numel() for t in truth.values())


@pytest.mark.parametrize("truth_base", ["bf16_input", "fp32_original"])
@pytest.mark.parametrize("case", ACCURACY_CASES, indirect=True)
def test_bf16_merge_no_worse_than_peft(case, truth_base, zoo, merger):
    bf16_base = zoo.base(f"{case.base}_bf16")
    adapters = [(zoo.adapter(name), 1.0 if w is None else w) for name, w in case.adapters]

    ours = load_output(merger.output(case, "bfloat16", base_kind=f"{case.base}_bf16"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, names = attach_adapters(load_base(bf16_base, dtype=torch.bfloat16), adapters)
        peft = merged_state_dict(model, names)

    w_source = bf16_base if truth_base == "bf16_input" else zoo.base(case.base)
    truth = exact_merge(load_folder_tensors(w_source), adapters)
    assert truth, "the adapters change no tensor"
    assert all(ours[k].dtype == torch.bfloat16 for k in truth)

    ours_per, ours_mean = mean_errors(ours, truth)
    peft_per, peft_mean = mean_errors(peft, truth)
    assert ours_mean <= peft_mean, f"mean |error| ours {ours_mean:.4e} > PEFT {peft_mean:.4e}"
    # per tensor, with a hair of slack for round-to-nearest ties landing differently
    worse = {k: (ours_per[k], peft_per[k]) for k in truth if ours_per[k] > peft_per[k] * 1.001}
    assert not worse, f"tensors where ours is farther from the exact merge than PEFT: {worse}"

    # negative control: an unmerged (wrong) answer is far worse than PEFT by the same measure
    base_tensors = load_folder_tensors(bf16_base)
    _, unmerged_mean = mean_errors(base_tensors, truth)
    assert unmerged_mean > 10 * peft_mean
