"""The verification gate: prove a candidate release equals base + adapters before it is published."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mergekit_lite.gate.algebra import check_algebra
from mergekit_lite.gate.endtoend import DEFAULT_PROMPTS, check_end_to_end, placement
from mergekit_lite.gate.packaging import check_packaging
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.structure import check_structure
from mergekit_lite.gate.tolerances import thresholds
from mergekit_lite.io.reader import TensorReader
from mergekit_lite.manifest.sections import VerifySpec
from mergekit_lite.plan.plan import Plan
from mergekit_lite.sources.adapter import Adapter
from mergekit_lite.sources.checkpoint import Checkpoint
from mergekit_lite.sources.tokenizer import has_tokenizer, load_tokenizer

__all__ = ["GateReport", "output_dtype", "run_gate"]


def output_dtype(plan: Plan) -> str:
    """The release's dtype: the float dtype holding most bytes."""
    sizes: Counter[str] = Counter()
    for t in plan.tensors:
        if t.dtype in ("F32", "F16", "BF16", "F64"):
            sizes[t.dtype] += t.nbytes
    return sizes.most_common(1)[0][0] if sizes else "F32"


def run_gate(
    plan: Plan,
    checkpoint: Checkpoint,
    adapters: list[Adapter],
    candidate: Path,
    settings: VerifySpec,
    device_map: str,
    tokenizer_source: Path | None,
) -> GateReport:
    """Run every check on `candidate` and return the report (it raises only for bugs)."""
    dtype = output_dtype(plan)
    limits = thresholds(dtype, settings.thresholds)
    report = GateReport(dtype=dtype)
    report.context["thresholds"] = limits
    base_files = {p.name for p in checkpoint.path.iterdir()}
    tensors = (
        _guarded(report, "structure", check_structure, report, plan, candidate, checkpoint.config, base_files) or {}
    )
    _guarded(
        report, "algebra", check_algebra, report, plan, adapters, TensorReader(checkpoint.tensors), tensors, limits
    )
    source = load_tokenizer(tokenizer_source)
    prompts = settings.prompts
    if source is not None:
        _guarded(
            report,
            "packaging",
            check_packaging,
            report,
            candidate,
            source,
            prompts or DEFAULT_PROMPTS,
            plan.embedding_rows,
        )
    else:
        report.skipped["packaging"] = "no tokenizer in the inputs"
    if not settings.logits:
        report.skipped["end_to_end"] = "`verify.logits` is false"
    elif not report.passed:
        report.skipped["end_to_end"] = "not run: the checks above failed"
    else:
        tokenizer = load_tokenizer(candidate) if has_tokenizer(candidate) else source
        _guarded(
            report,
            "end_to_end",
            check_end_to_end,
            report,
            candidate,
            checkpoint.path,
            [(a.path, a.weight) for a in adapters],
            placement(settings, device_map),
            tokenizer,
            prompts,
            settings.max_new_tokens,
            limits,
            plan.embedding_rows,
            frozenset(settings.thresholds),
            plan.combine,
        )
    return report


def _guarded(report: GateReport, group: str, check, *args):
    """Run one group of checks; a candidate so broken that a check cannot run fails that group."""
    try:
        return check(*args)
    except Exception as exc:  # noqa: BLE001  the gate reports on bad candidates, it does not crash on them
        report.add(group, "checks could run", False, type(exc).__name__, "", str(exc)[:300])
        return None
