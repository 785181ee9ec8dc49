"""THE table of gate thresholds, keyed by output dtype. A manifest may override the end-to-end ones.

Algebra figures are in units of the output dtype's ulp (see algebra.py):
  residual_rms    RMS over rows and probes of |W'x - expected| / sqrt(sum_j (ulp(W'_ij) x_j)^2)
  residual_max    the largest such ratio
  applied_sigmas  |share of the expected change W'x - Wx that is present - 1|, in standard errors
                  of the noise that rounding to the output dtype alone causes
  element_ulps    how far (in ulps) an element may be from the correctly rounded W + delta
                  (elementwise.py: |W' - v| <= (element_ulps + 1/2) ulp + float64 error)
Eval figures (verify.eval, gate/eval.py) compare the release's per-token losses on the user's data
with the reference's: eval_token_loss_diff the mean |difference| in nats, eval_perplexity_diff
|perplexity ratio - 1|.
End-to-end figures compare the merged release with PEFT's unmerged base+adapters on the prompts,
both computed in float32: what remains is the rounding of the merged weights to the output dtype.
The figures these thresholds were set against are in docs/performance.md.
"""

from __future__ import annotations

from typing import Any

TOLERANCES: dict[str, dict[str, float]] = {
    # float32: a margin over the worst figures of the parity suite, set when the merge's own fp32
    # arithmetic added errors correlated along a row (docs/performance.md). A real defect (a delta
    # missing or doubled) is millions of sigmas.
    "F32": {
        "residual_rms": 4.0,
        "residual_max": 32.0,
        "applied_sigmas": 64.0,
        "element_ulps": 1.0,
        "max_abs_logit_diff": 1e-3,
        "mean_kl": 1e-6,
        "top1_agreement": 1.0,
        "greedy_match": 1.0,
        "eval_token_loss_diff": 1e-4,
        "eval_perplexity_diff": 1e-4,
    },
    "BF16": {
        "residual_rms": 2.0,
        "residual_max": 16.0,
        "applied_sigmas": 8.0,
        "element_ulps": 1.0,
        "max_abs_logit_diff": 2.0,
        "mean_kl": 5e-3,
        "top1_agreement": 0.95,
        "greedy_match": 0.75,
        "eval_token_loss_diff": 0.02,
        "eval_perplexity_diff": 0.01,
    },
    "F16": {
        "residual_rms": 2.0,
        "residual_max": 16.0,
        "applied_sigmas": 8.0,
        "element_ulps": 1.0,
        "max_abs_logit_diff": 0.5,
        "mean_kl": 1e-3,
        "top1_agreement": 0.98,
        "greedy_match": 0.75,
        "eval_token_loss_diff": 5e-3,
        "eval_perplexity_diff": 2e-3,
    },
}
# verify.runtimes: the same float32 weights in another runtime (gate/runtimes.py). Only kernels differ,
# so the logits agree far closer than any merge's rounding (transformers 4.57 vs 5: docs/performance.md).
RUNTIME_TOLERANCES: dict[str, float] = {"max_abs_logit_diff": 1e-3, "greedy_match": 1.0}
HIGHER_IS_BETTER = {"top1_agreement", "greedy_match"}


def thresholds(dtype: str, overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """The thresholds for an output dtype, with the manifest's overrides applied."""
    table = dict(TOLERANCES.get(dtype, TOLERANCES["F32"]))
    table.update(overrides or {})
    return table


def within(metric: str, figure: float, limit: float) -> bool:
    """Whether a figure passes its threshold (at least for agreement rates, at most otherwise)."""
    return figure >= limit if metric in HIGHER_IS_BETTER else figure <= limit


# The end-to-end thresholds calibrated in the same run (gate/calibrate.py): the release may be this
# many times as far from the reference as the ideal merge (PEFT's float32 merge rounded once to the
# output dtype). For max |logit diff| a factor on the ideal's figure; for the KL, which grows as the
# square of a logit error, its square; for top-1 and greedy agreement a factor on the ideal's
# *disagreement* share. A threshold is never stricter than the table above (its floor) and one set
# in the manifest's `thresholds` is used as given. PEFT's own bf16 merge_and_unload, which rounds
# twice (the delta, then the sum), passes within them (tests/test_calibration.py).
CALIBRATION_MARGINS: dict[str, float] = {
    "max_abs_logit_diff": 2.0,
    "mean_kl": 4.0,
    "top1_agreement": 2.0,
    "greedy_match": 2.0,
    "eval_token_loss_diff": 2.0,  # verify.eval (gate/eval.py): a factor on the ideal's mean |token loss diff|
    "eval_perplexity_diff": 2.0,  # and on its relative perplexity difference
}
