"""Correct rounding: every element a merge changes is within half an ulp of the exact merge.

The truth is PEFT's own merge_and_unload run in float64 (base and factors widened exactly), an
evaluation independent of ours whose own error (about 2^-45 relative) is far below half an ulp
of any output dtype. The bound is half an ulp of the truth's binade, with a hair (2^-10 of it)
for that float64 error; PEFT's float32 merge of two overlapping adapters fails it (negative
control; tests/test_exact.py has the double-rounding one).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from builders import CASES_BY_ID, FLOAT16_CASES
from helpers import DTYPES, SLACK, half_ulps, load_output, merged_state_dict

# every merge variant: plain, rsLoRA, rank/alpha patterns, Conv1D, embedding LoRA, lora_bias,
# bias replacement, two weighted adapters, DoRA (linear and Conv1D), a converted PiSSA, trainable tokens
ROUNDING_CASES = ["lora", "rslora", "rank_alpha_pattern", "gpt2_fan_in_fan_out", "embedding_lora", "lora_bias",
                  "bias_all", "two_weighted", "dora", "gpt2_dora", "pissa_converted", "trainable_tokens_list"]
PARAMS = [pytest.param(c, d, id=f"{c}-{d}") for c in ROUNDING_CASES
          for d in ["float32", "bfloat16"] + (["float16"] if c in FLOAT16_CASES else [])]
_TRUTH: dict[str, dict[str, torch.Tensor]] = {}


def truth(oracle, case) -> dict[str, torch.Tensor]:
    """PEFT's merge in float64, tensors whose value the adapters change."""
    if case.id not in _TRUTH:
        model, names = oracle.peft_model(case, torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = merged_state_dict(model, names)
        base = oracle.base_tensors(case)
        _TRUTH[case.id] = {k: v for k, v in merged.items()
                           if k in base and base[k].shape == v.shape and not torch.equal(v, base[k].double())}
    return _TRUTH[case.id]


def worst(values: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[float, int]:
    """The largest error in half ulps over the tensors of `exact`, and how many elements exceed the bound."""
    errors = [half_ulps(values[k], t, dtype) for k, t in exact.items()]
    return max(float(e.max()) for e in errors), sum(int((e > SLACK).sum()) for e in errors)


@pytest.mark.parametrize("case,dtype_name", PARAMS, indirect=["case"])
def test_every_changed_element_is_correctly_rounded(case, dtype_name, merger, oracle) -> None:
    dtype = DTYPES[dtype_name]
    exact = truth(oracle, case)
    assert exact, "negative control: the adapters change no tensor"
    ours = load_output(merger.output(case, dtype_name))
    largest, beyond = worst(ours, exact, dtype)
    assert beyond == 0, f"{beyond} element(s) beyond half an ulp of the exact merge (worst {largest:.4f} half ulps)"


def test_peft_float32_merge_is_not_correctly_rounded(oracle) -> None:
    """Negative control: PEFT rounds B @ A, the scaling and each adapter's add in float32."""
    case = CASES_BY_ID["two_weighted"]
    largest, beyond = worst(oracle.merged(case, "float32"), truth(oracle, case), torch.float32)
    assert beyond > 100 and largest > 1.5, (beyond, largest)
