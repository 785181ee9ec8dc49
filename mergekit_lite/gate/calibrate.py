"""The end-to-end thresholds calibrated in the same run, against the ideal merge.

The ideal merge is PEFT's own float32 merge of the reference (merge_and_unload of the unmerged
base + adapters, done in place on the reference model once its forward passes are over, so that
no third model is held), with every weight then rounded once to the output dtype. Its distance to
the reference is what any correct merge in that dtype shows: the model's sensitivity to that
rounding, which for a strongly trained adapter on a sensitive model can be far above a fixed
table. The release passes when it is no farther from the reference than the ideal is, within the
margins of tolerances.CALIBRATION_MARGINS; the fixed table stays as the floor of each threshold
(a threshold is never stricter than the table), and a threshold the manifest sets is used as given.
"""

from __future__ import annotations

from typing import Any

import torch

from mergekit_lite.gate.tolerances import CALIBRATION_MARGINS, HIGHER_IS_BETTER

OUTPUT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def ideal_merge(
    reference: Any, output_dtype: str, fp8: dict[str, tuple[int, int]] | None = None
) -> tuple[Any | None, str]:
    """PEFT's merge_and_unload of `reference`, in place, every float weight rounded once to the
    output dtype (and held in the compute dtype); the weights named in `fp8` (an FP8 release's, with
    their blocks) quantized to e4m3 in blocks instead, as `fake_fp8` does. None and the reason when
    that cannot be done here.

    The reference is consumed: after this call only the returned model is valid.
    """
    target = OUTPUT_DTYPES.get(output_dtype)
    if target is None:
        return None, f"no ideal merge for output dtype {output_dtype}"
    if any(p.device.type == "meta" for p in reference.parameters()):
        return None, "the reference is offloaded to disk (its weights cannot be merged in place)"
    fp8 = fp8 or {}
    model = reference.merge_and_unload(safe_merge=False)
    params = dict(model.named_parameters())
    missing = sorted(set(fp8) - set(params))
    if missing:
        return None, f"the FP8 tensor `{missing[0]}` is not a parameter of the merged model by that name"
    with torch.no_grad():
        for name, param in params.items():  # the weights the release stores (buffers such as rotary
            if name in fp8:  # frequencies are recomputed)
                param.copy_(fake_fp8(param, fp8[name]).to(param.dtype))
            elif param.is_floating_point() and param.dtype != target:
                param.copy_(param.to(target).to(param.dtype))
    how = f"PEFT merge_and_unload in float32, rounded once to {str(target).removeprefix('torch.')}"
    if fp8:
        how += f" ({len(fp8)} weights quantized to FP8 e4m3 in blocks, by the gate)"
    return model.eval(), how


def fake_fp8(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """`w` quantized to e4m3 with one scale per block (amax / 448, partial edge blocks over the values
    they have) and dequantized, in float64: the gate's own quantizer, not the merge's (merge/fp8.py)."""
    rows, cols = w.shape
    bo, bi = block
    padded = torch.zeros((-(-rows // bo) * bo, -(-cols // bi) * bi), dtype=torch.float64)
    padded[:rows, :cols] = w.detach().to(torch.float64)
    tiles = padded.view(padded.shape[0] // bo, bo, padded.shape[1] // bi, bi)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)
    step = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    codes = (tiles / step).clamp(-448.0, 448.0).to(torch.float32).to(torch.float8_e4m3fn)
    return (codes.to(torch.float64) * step).view(padded.shape)[:rows, :cols]


def calibrated(
    limits: dict[str, float], ideal: dict[str, float], fixed: frozenset[str]
) -> tuple[dict[str, float], dict[str, str]]:
    """The thresholds with the ideal merge's figures applied: for each metric the table's value
    loosened to margin x the ideal's distance where that is larger; `fixed` ones untouched. Also
    returns, per metric, which rule set the threshold (for the report)."""
    out, rule = dict(limits), {}
    for metric, margin in CALIBRATION_MARGINS.items():
        if metric not in limits or metric not in ideal:
            continue
        if metric in fixed:
            rule[metric] = "set in the manifest"
            continue
        if metric in HIGHER_IS_BETTER:  # agreement rates: the margin multiplies the ideal's disagreement
            value = max(0.0, 1.0 - margin * (1.0 - ideal[metric]))
            loosen = value < limits[metric]
        else:
            value = margin * ideal[metric]
            loosen = value > limits[metric]
        if loosen:
            out[metric] = value
            rule[metric] = f"{margin:g} x the ideal merge's distance"
        else:
            rule[metric] = "the table's floor"
    return out, rule
