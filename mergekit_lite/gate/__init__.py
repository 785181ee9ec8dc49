"""The verification gate: prove a candidate release equals base + adapters before it is published."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mergekit_lite.gate.algebra import check_algebra
from mergekit_lite.gate.configs import check_configs
from mergekit_lite.gate.endtoend import DEFAULT_PROMPTS, EndToEnd, check_end_to_end, placement
from mergekit_lite.gate.eval import EvalProgress, check_eval
from mergekit_lite.gate.gguf import GgufFile, check_gguf
from mergekit_lite.gate.inflight import InFlight
from mergekit_lite.gate.integrity import check_integrity
from mergekit_lite.gate.llama_cpp import LlamaCpp, check_llama_cpp
from mergekit_lite.gate.packaging import check_packaging, check_processor_files
from mergekit_lite.gate.portable import check_portable
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.runtimes import check_ctranslate2, check_onnxruntime_genai, check_transformers4
from mergekit_lite.gate.structure import check_structure
from mergekit_lite.gate.tolerances import thresholds
from mergekit_lite.io.format import FLOAT_DTYPES
from mergekit_lite.io.reader import TensorReader
from mergekit_lite.manifest.sections import VerifySpec
from mergekit_lite.plan.plan import Plan
from mergekit_lite.sources.adapter import Adapter
from mergekit_lite.sources.checkpoint import Checkpoint
from mergekit_lite.sources.evaldata import EvalData
from mergekit_lite.sources.tokenizer import has_tokenizer, load_tokenizer, processor_files, processor_source

__all__ = ["GateReport", "output_dtype", "run_gate"]

_stages = logging.getLogger("mergekit_lite.stages")  # one INFO line per stage; the CLI shows them on stderr

T = TypeVar("T")


def output_dtype(plan: Plan) -> str:
    """The release's dtype: the float dtype holding most bytes."""
    sizes: Counter[str] = Counter()
    for t in plan.tensors:
        if t.dtype in FLOAT_DTYPES:
            sizes[t.dtype] += t.nbytes
    return sizes.most_common(1)[0][0] if sizes else "F32"


def run_gate(
    plan: Plan,
    checkpoint: Checkpoint,
    adapters: list[Adapter],
    candidate: Path,
    *,
    settings: VerifySpec,
    device_map: str,
    tokenizer_source: Path | None,
    integrity: bool = False,
    foreign: bool = False,
    portable: bool = True,
    eval_data: EvalData | None = None,
    eval_progress: EvalProgress | None = None,
    gguf: GgufFile | None = None,
    llama_cpp: LlamaCpp | None = None,
    in_flight: InFlight | None = None,
) -> GateReport:
    """Run every check on `candidate` (a release folder, staged or published) and return the report.

    `settings` is the manifest's `verify` section, `device_map` the merge's (the end-to-end models
    go there unless `verify.device_map` says otherwise), `tokenizer_source` the folder the release's
    tokenizer was copied from. With `integrity` (a published release), its files are checked against
    its SHA256SUMS and release.json (the shards' digests from the algebra's read of them: each is read
    once; these checks come first in the report); with `foreign` too (`verify --against`), a folder
    that is no release at all (no SHA256SUMS, release.json or manifest.yaml) skips that group.
    `report.read_back` holds those digests by file name,
    for a merge's SHA256SUMS and release.json. `portable` is the manifest's `output.compat` (the release
    claims to be readable by transformers 4 too). `eval_data` is `verify.eval`'s file, tokenized at
    plan time: scored by base, base + adapters and the release (gate/eval.py), `eval_progress` told
    the tokens scored. `gguf`: the GGUF file made from the release (`output.gguf`), read back and
    compared with it. `llama_cpp`: llama.cpp's converter and llama-cpp-python, for
    `verify.runtimes: [llama.cpp]` (which also runs that GGUF file). `in_flight`: the algebra checks
    run while the merge wrote the candidate (gate/inflight.py), whose rows stand for the algebra's
    when the shards are the planned ones. A check that cannot run fails its group; this raises only for bugs.
    """
    dtype = output_dtype(plan)
    limits = thresholds(dtype, settings.thresholds)
    report = GateReport(dtype=dtype)
    report.context["thresholds"] = limits
    if integrity:
        report.timings["integrity"] = 0.0  # run after the algebra, which reads the shards for it; listed first
    base_files = {p.name for p in checkpoint.path.iterdir()}
    source = load_tokenizer(tokenizer_source)
    tensors = _guarded(
        report, "structure", lambda: check_structure(report, plan, candidate, checkpoint.config, base_files)
    )
    _guarded(
        report,
        "structure",
        lambda: check_configs(
            report, plan, candidate, _config_sources(checkpoint.path, tokenizer_source), _eos_ids(source)
        ),
    )
    base = TensorReader(checkpoint.tensors)
    read_back: dict[Path, str] = {}  # the shards' SHA-256, from the algebra's one read of them
    flown = in_flight.result(tensors) if in_flight is not None else None
    if flown is not None and flown.limits == limits:  # run as the merge wrote
        report.extend(flown.report.checks)
        read_back.update(flown.read_back)
        report.timings["algebra"] = flown.seconds
        report.context["algebra_in_flight"] = True
        _stages.info("gate: algebra checks done in %.2f s, in flight", flown.seconds)
    else:
        _guarded(
            report,
            "algebra",
            lambda: check_algebra(
                report, plan, adapters, base=base, candidate=tensors or {}, limits=limits, digests=read_back
            ),
        )
    report.read_back = {str(p.relative_to(candidate)): d for p, d in read_back.items() if p.is_relative_to(candidate)}
    if integrity:
        _first(
            report,
            lambda: _guarded(
                report, "integrity", lambda: check_integrity(report, candidate, report.read_back, foreign)
            ),
        )
    prompts = settings.prompts
    if source is not None:
        texts = prompts or DEFAULT_PROMPTS
        _guarded(report, "packaging", lambda: check_packaging(report, candidate, source, texts, plan.embedding_rows))
    else:
        report.skipped["packaging"] = "the release ships no tokenizer (`tokenizer: none`)"
    if (processor := processor_source(tokenizer_source, checkpoint.path)) is not None:
        _guarded(report, "packaging", lambda: check_processor_files(report, candidate, processor))
    if portable:
        _guarded(report, "packaging", lambda: check_portable(report, candidate))
    else:
        report.skipped["packaging: transformers 4 layout"] = (
            "`output.compat` is false: configs shipped as the source has them"
        )

    def models(tokenizer: Any) -> EndToEnd:
        """What the end-to-end and eval checks load and compare, and their thresholds."""
        return EndToEnd(
            candidate=candidate,
            base=checkpoint.path,
            adapters=[(a.path, a.weight) for a in adapters],
            placement=placement(settings, device_map),
            tokenizer=tokenizer,
            prompts=prompts,
            new_tokens=settings.max_new_tokens,
            limits=limits,
            embedding_rows=plan.embedding_rows,
            fixed=frozenset(settings.thresholds),
            output_dtype=dtype,
            combine=plan.combine,
            dequantized=checkpoint.tensors if checkpoint.quantization else None,
            model_class=checkpoint.architecture.model_class,
            parameters=sum(math.prod(t.shape) for t in plan.tensors if t.dtype in FLOAT_DTYPES or t.fp8_block),
            layer_by_layer=settings.layer_by_layer,
            fp8=tuple((t.name, (t.fp8_block[0], t.fp8_block[1])) for t in plan.tensors if t.fp8_block),
            fp8_ragged=any(
                t.shape[0] % t.fp8_block[0] or t.shape[1] % t.fp8_block[1] for t in plan.tensors if t.fp8_block
            ),
            processor=candidate if processor_files(candidate) else processor,
        )

    if not settings.logits:
        report.skipped["end_to_end"] = "`verify.logits` is false"
    elif not report.passed:
        report.skipped["end_to_end"] = "not run: the checks above failed"
    else:
        check = models(load_tokenizer(candidate) if has_tokenizer(candidate) else source)
        _guarded(report, "end_to_end", lambda: check_end_to_end(report, check))
    if eval_data is not None:  # run whatever failed above: what the candidate costs on the user's own data
        _guarded(report, "eval", lambda: check_eval(report, models(None), eval_data, eval_progress))
    if settings.runtimes:  # run whatever failed above: a runtime may be the only one to see a defect
        new = settings.max_new_tokens
        shipped = (gguf.name, gguf.outtype) if gguf is not None else None
        for runtime in settings.runtimes:
            if runtime == "llama.cpp":
                _guarded(
                    report,
                    "runtimes",
                    lambda: check_llama_cpp(report, candidate, _packaged(candidate), prompts, new, llama_cpp, shipped),
                )
                continue
            check = {
                "transformers4": check_transformers4,
                "ctranslate2": check_ctranslate2,
                "onnxruntime-genai": check_onnxruntime_genai,
            }[runtime]
            _guarded(
                report, "runtimes", lambda check=check: check(report, candidate, _packaged(candidate), prompts, new)
            )
    if gguf is not None:
        new = settings.max_new_tokens
        _guarded(report, "gguf", lambda: check_gguf(report, candidate, gguf, _packaged(candidate), prompts, new))
    return report


def _first(report: GateReport, record: Callable[[], object]) -> None:
    """Run `record` and move the checks it adds to the front of the report."""
    before = len(report.checks)
    record()
    added = report.checks[before:]
    del report.checks[before:]
    report.checks[:0] = added


def _packaged(candidate: Path):
    """The release's own tokenizer as transformers 5 loads it; None when it ships none or it is broken
    (the packaging checks report that)."""
    try:
        return load_tokenizer(candidate) if has_tokenizer(candidate) else None
    except Exception:  # noqa: BLE001
        return None


def _config_sources(base: Path, tokenizer_source: Path | None) -> dict[str, Path]:
    """Each config file the release ships -> the folder holding the copy it must agree with."""
    sources = {"config.json": base, "generation_config.json": base}
    if tokenizer_source is not None:
        sources["tokenizer_config.json"] = tokenizer_source
    return sources


def _eos_ids(tokenizer) -> frozenset[int]:
    """The EOS id the release's generation_config may add: the source tokenizer's."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset() if eos is None else frozenset([eos])


def _guarded(report: GateReport, group: str, check: Callable[[], T]) -> T | None:
    """Run one group of checks, timed; a candidate so broken that a check cannot run fails that group."""
    began = time.monotonic()
    try:
        return check()
    except Exception as exc:  # noqa: BLE001  the gate reports on bad candidates, it does not crash on them
        taken = sum(1 for c in report.checks if c.id.startswith(f"{group}.checks_could_run"))
        report.add(
            group,
            "checks could run",
            False,
            figure=type(exc).__name__,
            threshold="",
            detail=str(exc)[:300],
            id=f"{group}.checks_could_run" + (f"_{taken + 1}" if taken else ""),  # a group run twice
        )
        return None
    finally:
        report.timings[group] = report.timings.get(group, 0.0) + time.monotonic() - began
        _stages.info("gate: %s checks done in %.2f s", group, time.monotonic() - began)
