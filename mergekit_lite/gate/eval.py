"""Gate check on the user's own data (`verify.eval`): per-token loss and perplexity of the base, of
PEFT's base + adapters (unmerged, the reference) and of the release, on the records of an eval file.

This is the "compare outputs and metrics with the adapter-based version" step LoRA guides leave to
the user, run on every release: the release must score the data as the reference does, within a
margin calibrated in the same run, as the end-to-end check's is (gate/calibrate.py). The ideal
merge (PEFT's float32 merge of the reference rounded once to the output dtype) scores the data
too; its distance to the reference is what any correct merge in that dtype shows, and the release
may be CALIBRATION_MARGINS times as far. The table's floor (tolerances.py) is capped at
EFFECT_SHARE of the adapters' own effect on the token losses, so that dropping an adapter, whose
distance is that effect, always fails. Base and base + adapters perplexities are the adapters'
effect on the data, for the report and the model card.

The models are loaded and run as the end-to-end check's (endtoend.reference_model, model_loader,
_forward: float32, the manifest's placement), one at a time: the reference (adapters on, then
off), then the ideal merge made from it in place, then the release. Records are scored one after
another, each forward's logits reduced to its token losses at once, so memory holds one model and
one record's logits. Where the end-to-end check runs layer by layer (endtoend.choose_runner), so
does this one: all four models in one pass over the layers per batch of records (gate/streamed.py).
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from mergekit_lite.gate.calibrate import OUTPUT_DTYPES, calibrated, ideal_merge
from mergekit_lite.gate.endtoend import (
    COMPUTE_DTYPE,
    EFFECT_SHARE,
    EndToEnd,
    _forward,
    choose_runner,
    model_loader,
    reference_model,
    release_loading,
)
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.tolerances import CALIBRATION_MARGINS, within
from mergekit_lite.sources.evaldata import EvalData

TOKEN_LOSS = "eval_token_loss_diff"  # mean over tokens of |loss(release) - loss(reference)|, in nats
PERPLEXITY = "eval_perplexity_diff"  # |perplexity(release) / perplexity(reference) - 1|
PASSES = 4  # forwards over the data: base + adapters, base, ideal merge, release

EvalProgress = Callable[[int, int], None]  # (tokens scored so far, of how many), after each record


def check_eval(report: GateReport, check: EndToEnd, data: EvalData, progress: EvalProgress | None = None) -> None:
    """Record the eval rows for the candidate of `check` (the end-to-end check's models and
    thresholds) on `data`: `eval.token_loss_diff` and `eval.perplexity_diff`, release against the
    reference, and the four models' perplexities in the report's context under `eval`."""
    layered, runner = choose_runner(check)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tick = _Ticker(progress, PASSES * data.tokens)
        losses, how = _score_layered(check, data, tick) if layered else _score(check, data, tick)
    _record(report, check, data, losses, how)
    report.context["eval"]["runner"] = runner


class _Ticker:
    """Tokens scored, told to `progress` after each record."""

    def __init__(self, progress: EvalProgress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, tokens: int) -> None:
        self.done += tokens
        if self.progress is not None:
            self.progress(self.done, self.total)


def _score(check: EndToEnd, data: EvalData, tick: _Ticker) -> tuple[dict[str, torch.Tensor], str]:
    """Per-token losses (float64, every record's in turn) of `reference`, `base`, `ideal` (absent
    when no ideal merge can be made here) and `release`; and how the ideal was made, or why not."""
    losses: dict[str, torch.Tensor] = {}
    with check.placement.loading() as (for_reference, for_release):
        reference = reference_model(
            check.base,
            check.adapters,
            COMPUTE_DTYPE,
            for_reference,
            embedding_rows=check.embedding_rows,
            combine=check.combine,
            dequantized=check.dequantized,
            model_class=check.model_class,
        )
        losses["reference"] = token_losses(reference, data, tick)
        with reference.disable_adapter():
            losses["base"] = token_losses(reference, data, tick)
        ideal, how = ideal_merge(reference, check.output_dtype, dict(check.fp8))  # consumes the reference
        del reference
        if ideal is not None:
            losses["ideal"] = token_losses(ideal, data, tick)
        else:
            tick(data.tokens)
        del ideal
        gc.collect()
        loading = release_loading(check, for_release)
        release = model_loader(check.model_class).from_pretrained(check.candidate, dtype=COMPUTE_DTYPE, **loading)
        losses["release"] = token_losses(release.eval(), data, tick)
        del release
    return losses, how


PASS_TOKENS = 8192  # layer by layer: records scored per pass over the layers, up to this many tokens


def _score_layered(check: EndToEnd, data: EvalData, tick: _Ticker) -> tuple[dict[str, torch.Tensor], str]:
    """_score with the four models run layer by layer from their files (gate/streamed.py): records
    in batches of about PASS_TOKENS tokens, each batch one pass over every model's layers."""
    from mergekit_lite.gate import streamed

    dtype = OUTPUT_DTYPES.get(check.output_dtype)
    found: dict[str, list[torch.Tensor]] = {}
    with streamed.opened(check.base, check.adapters, check.candidate, check.model_class, ideal=dtype) as models:
        for batch in _batches(data.sequences, PASS_TOKENS):
            ids = [torch.tensor(seq) for seq in batch]
            for name, values in streamed.logits(models, ids, base=True, reduce=_losses).items():
                found.setdefault(name, []).extend(values)
                tick(sum(len(seq) - 1 for seq in batch))
    if dtype is None:
        tick(data.tokens)
    how = (
        f"no ideal merge for output dtype {check.output_dtype}"
        if dtype is None
        else f"PEFT's merge of each layer in float32, rounded once to {str(dtype).removeprefix('torch.')} (layer by layer)"
    )
    return {name: torch.cat(values) for name, values in found.items()}, how


def _batches(sequences: list[list[int]], tokens: int) -> list[list[list[int]]]:
    out: list[list[list[int]]] = [[]]
    for seq in sequences:
        if out[-1] and sum(map(len, out[-1])) + len(seq) > tokens:
            out.append([])
        out[-1].append(seq)
    return [batch for batch in out if batch]


def _losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The next-token losses of one sequence from its logits (row k predicts token k + 1)."""
    return -torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:].unsqueeze(-1)).squeeze(-1)


def token_losses(model: Any, data: EvalData, tick: Callable[[int], None] | None = None) -> torch.Tensor:
    """The next-token loss (nats, float64) of every scored token of `data`, record after record."""
    out = []
    for seq in data.sequences:
        ids = torch.tensor(seq)
        logits = _forward(model, ids)
        out.append(_losses(logits, ids))
        del logits
        if tick is not None:
            tick(len(seq) - 1)
    return torch.cat(out)


def perplexity(losses: torch.Tensor) -> float:
    """exp(mean token loss)."""
    return math.exp(float(losses.mean()))


def distances(losses: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far `losses` are from the reference's: the two eval metrics."""
    return {
        TOKEN_LOSS: float((losses - reference).abs().mean()),
        PERPLEXITY: abs(math.expm1(float(losses.mean() - reference.mean()))),
    }


_SHOWN = {"reference": "base_plus_adapters", "ideal": "ideal_merge"}
_NAMES = {
    TOKEN_LOSS: "per-token loss, release vs base + adapters",
    PERPLEXITY: "perplexity, release vs base + adapters",
}


def _record(report: GateReport, check: EndToEnd, data: EvalData, losses: dict[str, torch.Tensor], how: str) -> None:
    """The two rows, release against the reference, and the report's `eval` context."""
    reference = losses["reference"]
    figures = distances(losses["release"], reference)
    effect = distances(losses["base"], reference)
    ideal = distances(losses["ideal"], reference) if "ideal" in losses else {}
    limits, rules, note = _thresholds(check, effect, ideal)
    ppl = {_SHOWN.get(name, name): perplexity(values) for name, values in losses.items()}
    scored = f"{data.tokens} tokens of {len(data.sequences)} records of {data.file}"
    detail = {
        TOKEN_LOSS: f"mean |loss difference| over {scored}; base vs base + adapters: {effect[TOKEN_LOSS]:.4g}{note}",
        PERPLEXITY: f"perplexity: base {ppl['base']:.4g}, base + adapters {ppl['base_plus_adapters']:.4g}, "
        f"release {ppl['release']:.4g}",
    }
    for metric, name in _NAMES.items():
        if metric in ideal:
            versus = distances(losses["release"], losses["ideal"])[metric]
            detail[metric] += f"; ideal merge: {ideal[metric]:.4g}, release vs ideal: {versus:.4g}"
        value, limit = figures[metric], limits[metric]
        report.add(
            "eval",
            name,
            within(metric, value, limit),
            figure=value,
            threshold=limit,
            detail=f"{detail[metric]}; threshold: {rules[metric]}",
            id=f"eval.{metric.removeprefix('eval_')}",
        )
    report.context["eval"] = {
        **data.describe(),
        "perplexity": ppl,
        "mean_token_loss": {_SHOWN.get(name, name): float(values.mean()) for name, values in losses.items()},
        "adapter_effect": effect,
        "calibration": {
            "ideal": how,
            "margins": {m: CALIBRATION_MARGINS[m] for m in _NAMES},
            "ideal_vs_reference": ideal,
        }
        if ideal
        else {"skipped": how},
    }


def _thresholds(
    check: EndToEnd, effect: dict[str, float], ideal: dict[str, float]
) -> tuple[dict[str, float], dict[str, str], str]:
    """The two thresholds: the table's floor, the token-loss one capped at EFFECT_SHARE x the
    adapters' effect, then loosened to margin x the ideal merge's distance (calibrate.calibrated);
    which rule set each, and a note on the cap for the detail."""
    limits = {metric: check.limits[metric] for metric in _NAMES}
    note = ""
    if effect[TOKEN_LOSS] == 0:
        note = "; the adapters change no token's loss on this data"
    elif TOKEN_LOSS not in check.fixed and EFFECT_SHARE * effect[TOKEN_LOSS] < limits[TOKEN_LOSS]:
        limits[TOKEN_LOSS] = EFFECT_SHARE * effect[TOKEN_LOSS]
        note = f" (floor: {EFFECT_SHARE:g} x the adapters' effect)"
    limits, rules = calibrated(limits, ideal, check.fixed)
    for metric in _NAMES:
        rules.setdefault(metric, "set in the manifest" if metric in check.fixed else "the table (no ideal merge)")
    return limits, rules, note
