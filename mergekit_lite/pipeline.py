"""The one module that calls every stage: manifest -> plan -> merge -> package -> publish."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import InputError, MergekitError, PlanError
from mergekit_lite.gate import GateReport, output_dtype, run_gate
from mergekit_lite.gate.eval import EvalProgress
from mergekit_lite.gate.gguf import GgufFile
from mergekit_lite.gate.inflight import InFlight, can_fly
from mergekit_lite.gate.llama_cpp import LlamaCpp, find_llama_cpp
from mergekit_lite.gate.report import fmt, markdown, skipped_report
from mergekit_lite.gate.runtimes import check_runtimes_available
from mergekit_lite.gate.tolerances import thresholds
from mergekit_lite.io.digests import InputDigests
from mergekit_lite.manifest.load import LoadedManifest, load_manifest
from mergekit_lite.manifest.sections import GgufSpec
from mergekit_lite.merge.executor import check_available, run_shards
from mergekit_lite.merge.factors import require_finite
from mergekit_lite.merge.merge import Progress
from mergekit_lite.plan.build import build_plan
from mergekit_lite.plan.plan import Plan
from mergekit_lite.release import publish as publish_module
from mergekit_lite.release.card import hub_id_of, model_card
from mergekit_lite.release.configs import write_configs, write_index, write_json
from mergekit_lite.release.gguf import Converter, convert, find_converter, gguf_name, write_modelfile
from mergekit_lite.release.publish import check_output, check_unlocked, new_parents, output_lock, publish, staging
from mergekit_lite.release.receipt import resolved_manifest, write_checksums, write_receipt
from mergekit_lite.sources.adapter import Adapter, read_adapter, task_type
from mergekit_lite.sources.checkpoint import Checkpoint, read_checkpoint, weight_files
from mergekit_lite.sources.evaldata import EvalData, read_eval, require_language_model
from mergekit_lite.sources.hub import resolve_hub_sources
from mergekit_lite.sources.tokenizer import (
    copy_processor,
    copy_tokenizer,
    load_tokenizer,
    processor_files,
    processor_source,
    tokenizer_files,
    tokenizer_source,
)


class GateFailed(MergekitError):
    """The candidate failed the verification gate; nothing was published. Exit code 1."""

    exit_code = 1

    def __init__(self, report: GateReport, kept: Path | None) -> None:
        first = report.failures[0]
        where = (
            f"the rejected candidate is kept at `{kept}`"
            if kept
            else "the candidate was removed (--keep-rejected keeps it)"
        )
        super().__init__(
            f"verification failed: {first.group}: {first.name} = {fmt(first.figure)} (threshold {fmt(first.threshold)})"
            f"{'; ' + first.detail if first.detail else ''}; nothing was published; {where}"
        )
        self.report = report
        self.kept = kept


@dataclass
class Result:
    """A published release and its gate report (None when the gate was skipped)."""

    output: Path
    report: GateReport | None


@dataclass
class Job:
    """Everything known before the first byte is written."""

    manifest: LoadedManifest
    checkpoint: Checkpoint
    adapters: list[Adapter]
    plan: Plan
    inputs: InputDigests | None = None  # the inputs' digests, being computed (prepare's hash_inputs)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: plan, merge, package, ...
    force: bool = False  # replace whatever is at the output, not only an earlier release
    tokenizer: Path | None = None  # the folder the release's tokenizer is copied from (None: `tokenizer: none`)
    converter: Converter | None = None  # llama.cpp's converter, for `output.gguf`
    llama_cpp: LlamaCpp | None = None  # llama.cpp's converter and runtime, for `verify.runtimes: [llama.cpp]`
    eval_data: EvalData | None = None  # `verify.eval`'s records, tokenized (None when there is none)


def prepare(manifest_path: str | Path, for_output: bool = True, hash_inputs: bool = False, force: bool = False) -> Job:
    """Load the manifest, read headers and configs, build the plan, and (for a merge) vet the output.

    Reads no tensor data and writes nothing; every input problem surfaces here. With `hash_inputs`
    (a merge about to run), the base's weight files start being hashed for the receipt on a
    background thread as soon as their names are known (Job.inputs; execute adds the rest). With
    `force`, an existing output is replaced even when it is not a mergekit-lite release.
    """
    began = time.monotonic()
    loaded = load_manifest(manifest_path)
    if for_output:
        check_unlocked(loaded.output_path)  # a busy output is retryable (exit 75): said before any work
    loaded = resolve_hub_sources(loaded)  # hub ids -> local snapshot folders, once
    m = loaded.manifest
    inputs = InputDigests(_base_files(loaded.base_path)) if hash_inputs else None
    try:
        adapters = [
            read_adapter(p, i, spec.weight, allow_pickle=spec.allow_pickle)
            for i, (p, spec) in enumerate(zip(loaded.adapter_paths, m.adapters))
        ]
        checkpoint = read_checkpoint(loaded.base_path, task_type=task_type(adapters), dequantize=m.base.dequantize)
        plan = build_plan(checkpoint, adapters, m.dtype, loaded.max_shard_bytes, combine=m.combine, fp8=m.fp8)
        resolve_device(m.device_map)
        _check_fp8_release(plan, m)
        if m.verify.runtimes and m.verify.enabled:
            # a runtime not installed (or a release no runtime check can load) is refused before any write
            check_runtimes_available(m.verify.runtimes, checkpoint.architecture.model_class)
        llama_cpp = None
        if "llama.cpp" in m.verify.runtimes and (m.verify.enabled or not for_output):  # `verify` always gates
            what = "verify.runtimes: [llama.cpp]"
            llama_cpp = find_llama_cpp(find_converter(m.output.gguf or GgufSpec(), loaded.root, what).script)
        converter = None
        if for_output:
            check_available(m.executor)  # Ray, when asked for, must be installed: refused before anything is written
            if m.output.gguf is not None:  # llama.cpp's converter, found (or refused) before anything is written
                converter = find_converter(m.output.gguf, loaded.root)
            check_output(loaded.output_path, loaded.input_folders, m.output.overwrite, _disk_bytes(plan, m), force)
            check_adapter_values(adapters)
        tokenizer = tokenizer_source(m.tokenizer, loaded.base_path, loaded.adapter_paths, loaded.resolve)
        eval_data = _eval_data(loaded, checkpoint, tokenizer)
    except BaseException:
        if inputs is not None:
            inputs.close()
        raise
    return Job(
        loaded,
        checkpoint,
        adapters,
        plan,
        inputs,
        timings={"plan": time.monotonic() - began},
        force=force,
        tokenizer=tokenizer,
        eval_data=eval_data,
        converter=converter,
        llama_cpp=llama_cpp,
    )


def _check_fp8_release(plan: Plan, m: Any) -> None:
    """An FP8 release (`dtype: float8_e4m3fn`) is loaded by transformers, as its FP8 base is: the GGUF
    converter and the other runtimes the gate can run are refused before anything is written."""
    if plan.quantization_config is None:
        return
    if m.output.gguf is not None:
        raise PlanError(
            "`output.gguf` with `dtype: float8_e4m3fn` is not supported: llama.cpp's converter would "
            "re-quantize FP8 weights; merge with `dtype: bfloat16` for a GGUF release"
        )
    if m.verify.runtimes and m.verify.enabled:
        raise PlanError(
            f"`verify.runtimes: {list(m.verify.runtimes)}` with `dtype: float8_e4m3fn` is not supported: those "
            "runtimes do not load FP8 block-scaled weights; drop `runtimes` or merge with `dtype: bfloat16`"
        )


GGUF_BYTES = {"bf16": 2.0, "f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}  # per element; q8_0: 32 int8 + an f16 scale


def _disk_bytes(plan: Plan, m: Any) -> int:
    """The release's weights, plus the GGUF file's with `output.gguf`."""
    if m.output.gguf is None:
        return plan.total_bytes
    elements = sum(math.prod(t.shape) for t in plan.tensors)
    return plan.total_bytes + int(elements * GGUF_BYTES[m.output.gguf.outtype])


def _gguf_file(job: Job) -> GgufFile | None:
    """The release's GGUF file as the gate checks it (None without `output.gguf`)."""
    loaded = job.manifest
    spec = loaded.manifest.output.gguf
    if spec is None:
        return None
    name = loaded.output_path.name
    return GgufFile(gguf_name(name, spec), spec.outtype, name, loaded.manifest.base.id or hub_id_of(loaded.base_path))


def _eval_data(loaded: LoadedManifest, checkpoint: Checkpoint, tokenizer: Path | None) -> EvalData | None:
    """`verify.eval`'s file read and tokenized with the release's tokenizer: every problem in it is
    an input error now, before anything is merged. None when the manifest has none or no gate."""
    spec = loaded.manifest.verify
    if spec.eval is None or not spec.enabled:
        return None
    where = loaded.at("verify", "eval")
    require_language_model(checkpoint.architecture.model_class, checkpoint.config, where)
    return read_eval(spec.eval, load_tokenizer(tokenizer), where)


def _base_files(base: Path) -> list[Path]:
    """The base's weight files if their names can be had now; errors are read_checkpoint's to report."""
    try:
        return [p for p in weight_files(base) if p.is_file()] if (base / "config.json").is_file() else []
    except (MergekitError, OSError):
        return []


def check_adapter_values(adapters: list[Adapter]) -> None:
    """Refuse NaN/Inf in the adapters' tensors before anything is written.

    The one place before the merge that reads tensor data: adapters are small next to the base,
    and a non-finite factor is an input error (exit 2), not a failed merge.
    """
    for adapter in adapters:
        reader = adapter.reader()
        for key in adapter.keys:
            tensor = reader.load(key.key)
            if tensor.is_floating_point():
                require_finite(tensor, adapter.label, key.key)


def run_plan(manifest_path: str | Path) -> Plan:
    """The plan for a manifest (a dry run that also vets the output location)."""
    return prepare(manifest_path).plan


def execute(
    job: Job,
    progress: Progress | None = None,
    verify: bool = True,
    keep_rejected: bool = False,
    eval_progress: EvalProgress | None = None,
) -> Result:
    """Merge into a staging folder, package, run the gate, and publish only if it passes.

    `progress` is told each tensor written, `eval_progress` the tokens of `verify.eval` scored."""
    loaded = job.manifest
    m = loaded.manifest
    output = loaded.output_path
    lap = _stopwatch(job.timings)
    with job.inputs or InputDigests([]) as inputs:  # hashed on a background thread all along
        device = resolve_device(m.device_map)
        source = job.tokenizer
        inputs.add(_inputs(job, source))
        with new_parents(output), output_lock(output), staging(output) as stage, ExitStack() as flying:
            check_output(output, loaded.input_folders, m.output.overwrite, job.plan.total_bytes, job.force)
            gated = verify and m.verify.enabled
            # the shards' SHA-256: computed as they are written, or, gated, by the gate's one read of them
            digests: dict[str, str] = {}
            flight = None
            if gated and m.verify.in_flight and can_fly(job.plan, m.executor.kind):
                dtype = output_dtype(job.plan)
                flight = InFlight(
                    job.plan, job.checkpoint, job.adapters, stage, dtype, thresholds(dtype, m.verify.thresholds)
                ).start()
                flying.callback(flight.cancel)  # on any way out: the checks stop before the staging folder goes
            run_shards(
                m.executor,
                job.plan,
                job.checkpoint.tensors,
                job.adapters,
                stage,
                device,
                progress=progress,
                digests=None if gated else digests,
                written=flight.written if flight is not None else None,
            )
            lap("merge")
            write_index(stage, job.plan)
            if source is not None:
                copy_tokenizer(source, stage)
            if (processor := processor_source(source, job.checkpoint.path)) is not None:
                copy_processor(processor, stage)
            write_configs(
                stage,
                job.checkpoint.path,
                job.checkpoint.config,
                job.plan,
                load_tokenizer(source),
                compat=m.output.compat,
            )
            report = None
            lap("package")
            gguf = _gguf_file(job)
            if gguf is not None and job.converter is not None and m.output.gguf is not None:
                convert(job.converter, stage, m.output.gguf, gguf.model_name, gguf.base_model, gguf.name)
                if m.output.gguf.modelfile:
                    write_modelfile(stage, gguf.name, load_tokenizer(source))
                lap("gguf")
            if gated:
                report = run_gate(
                    job.plan,
                    job.checkpoint,
                    job.adapters,
                    stage,
                    settings=m.verify,
                    device_map=m.device_map,
                    tokenizer_source=source,
                    portable=m.output.compat,
                    eval_data=job.eval_data,
                    eval_progress=eval_progress,
                    gguf=gguf,
                    llama_cpp=job.llama_cpp,
                    in_flight=flight,
                )
                report.context.update(provenance(job))
                lap("verify")
                if not report.passed:
                    kept = None
                    if keep_rejected:  # the candidate goes with the report that rejected it
                        write_json(stage / "verification.json", report.to_dict())
                        kept = publish_module.keep_rejected(stage, output)
                    raise GateFailed(report, kept)
                digests = report.read_back  # of the bytes on disk the checks saw; a shard not read is hashed
            _describe(job, stage, report, inputs.result(), digests)
            lap("describe")
            with _interrupts_deferred() as interrupted:
                publish(stage, output, m.output.overwrite, job.force)
            lap("publish")
    if interrupted:
        what = "terminated (SIGTERM)" if signal.SIGTERM in interrupted else "interrupted"
        raise Interrupted(
            f"{what} after publishing: the release at `{output}` is complete and verified",
            143 if signal.SIGTERM in interrupted else 130,
        )
    return Result(output, report)


def _stopwatch(timings: dict[str, float]) -> Callable[[str], None]:
    """`lap(stage)` records the seconds since the previous lap (or since now) under `stage`."""
    last = [time.monotonic()]

    def lap(stage: str) -> None:
        now = time.monotonic()
        timings[stage] = timings.get(stage, 0.0) + now - last[0]
        logging.getLogger("mergekit_lite.stages").info("%s done in %.2f s", stage, now - last[0])
        last[0] = now

    return lap


class Interrupted(MergekitError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143) arrived while the release was being renamed into
    place; it was let finish."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def _interrupts_deferred() -> Iterator[list[int]]:
    """Hold off SIGINT and SIGTERM during the publish step, so that neither can leave the swap half
    done; the signals that arrived are listed."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    deferred = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, _: seen.append(signum)) for s in deferred}
    try:
        yield seen
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _describe(
    job: Job, stage: Path, report: GateReport | None, inputs: list[dict[str, Any]], digests: dict[str, str]
) -> None:
    """verification.json, the model card, the resolved manifest, the receipt and SHA256SUMS."""
    loaded = job.manifest
    m = loaded.manifest
    reason = "`verify.enabled` is false in the manifest" if not m.verify.enabled else "--no-verify"
    verification = (
        report.to_dict() if report is not None else {**skipped_report(reason), **provenance(job, gated=False)}
    )
    write_json(stage / "verification.json", verification)
    gate_md = markdown(report, "mergekit-lite gate") if report is not None else None
    card = model_card(
        loaded.output_path.name,
        job.plan,
        base=loaded.base_path,
        base_id=m.base.id,
        base_revision=m.base.revision,
        adapters=_card_adapters(job),
        gate_markdown=gate_md,
        skipped_because=reason,
        tokenizer=_tokenizer_label(job),
        manifest_license=m.license,
        evaluation=report.context.get("eval") if report is not None else None,
    )
    (stage / "README.md").write_text(card, encoding="utf-8")
    (stage / "manifest.yaml").write_text(
        resolved_manifest(m, loaded.base_path, loaded.adapter_paths, loaded.output_path), encoding="utf-8"
    )
    # no path of the build machine: a hub snapshot's files as `id@commit/file`, the others relative to
    # the manifest's folder (as the manifest writes them); hub sources by id and commit alone
    inputs = [dict(r, path=_input_name(Path(r["path"]), loaded)) for r in inputs]
    sources = [{k: v for k, v in r.items() if k != "path"} for r in loaded.hub_sources]
    hashed = write_receipt(stage, inputs, job.plan, verification, known=digests, sources=sources)
    write_checksums(stage, hashed)  # only release.json itself is left to hash


def _input_name(path: Path, loaded: LoadedManifest) -> str:
    """An input file as release.json names it: `id@commit/file` in a hub snapshot, else relative to the
    manifest's folder."""
    for pin in loaded.pins.values():
        for folder in (pin.folder, pin.folder.resolve()):
            if path.is_relative_to(folder):
                return f"{pin.repo_id}@{pin.commit}/{path.relative_to(folder)}"
    return os.path.relpath(path, loaded.root)


def _tokenizer_label(job: Job) -> str:
    """Which source's tokenizer the release ships, in words (no build-machine path)."""
    source, loaded = job.tokenizer, job.manifest
    if source is None:
        return "none shipped (`tokenizer: none`): serving needs the base's tokenizer passed separately"
    for i, folder in enumerate(loaded.adapter_paths):
        if source == folder:
            return f"adapter {i}'s (`{folder.name}`), copied byte for byte"
    if source == loaded.base_path:
        return f"the base's (`{loaded.manifest.base.id or source.name}`), copied byte for byte"
    return f"`{source.name}` (`tokenizer:` in the manifest), copied byte for byte"


def provenance(job: Job, gated: bool = True) -> dict[str, Any]:
    """What a report is of, beside its `timestamp` and `tool` (gate/report.py): the manifest's SHA-256
    and, when the gate ran, its prompts in full."""
    from mergekit_lite.gate.endtoend import DEFAULT_PROMPTS
    from mergekit_lite.io.digests import sha256_file

    found: dict[str, Any] = {"manifest_sha256": sha256_file(job.manifest.source)}
    if gated:
        found["prompts"] = list(job.manifest.manifest.verify.prompts or DEFAULT_PROMPTS)
    return found


def _card_adapters(job: Job) -> list[dict[str, Any]]:
    """The plan's adapter rows, a hub adapter named by `id@commit` rather than its cache folder."""
    pins = job.manifest.pins
    return [
        dict(a, path=f"{pin.repo_id}@{pin.commit}") if (pin := pins.get(f"adapters[{i}]")) else a
        for i, a in enumerate(job.plan.adapters)
    ]


def _inputs(job: Job, source: Path | None) -> list[Path]:
    """Every file the release is made from: base shards and configs, adapters, tokenizer files."""
    inputs = [*job.checkpoint.files, job.checkpoint.path / "config.json"]
    for extra in ("generation_config.json", "model.safetensors.index.json"):
        if (job.checkpoint.path / extra).is_file():
            inputs.append(job.checkpoint.path / extra)
    for adapter in job.adapters:
        inputs += [
            adapter.path / "adapter_config.json",
            adapter.weights_file or adapter.path / "adapter_model.safetensors",
        ]
    if source is not None:
        inputs += [p for p in tokenizer_files(source) if p not in inputs]
    if (processor := processor_source(source, job.checkpoint.path)) is not None:
        inputs += [p for p in processor_files(processor) if p not in inputs]
    if job.eval_data is not None and (spec := job.manifest.manifest.verify.eval) is not None:
        inputs.append(Path(spec.path))  # what the release was measured on
    return inputs


def verify_release(
    manifest_path: str | Path, against: str | Path | None = None, eval_progress: EvalProgress | None = None
) -> GateReport:
    """Run the gate on an existing release: its files against its SHA256SUMS and release.json first,
    then every other check. `manifest_path` is a manifest (the release is its output, or `against`)
    or a release folder, checked against the manifest.yaml it ships."""
    manifest_path = Path(manifest_path)
    foreign = against is not None  # named by --against: may be another tool's merge
    if manifest_path.is_dir():
        if not (manifest_path / "manifest.yaml").is_file():
            raise InputError(
                f"`{manifest_path}` is a folder without `manifest.yaml`; pass a release folder or a manifest file"
            )
        against = manifest_path if against is None else against
        manifest_path = manifest_path / "manifest.yaml"
    job = prepare(manifest_path, for_output=False)
    loaded = job.manifest
    m = loaded.manifest
    candidate = Path(against).resolve() if against is not None else loaded.output_path
    if not candidate.is_dir():
        raise InputError(f"release `{candidate}` does not exist or is not a folder")
    source = job.tokenizer
    settings = m.verify.model_copy(update={"enabled": True})
    report = run_gate(
        job.plan,
        job.checkpoint,
        job.adapters,
        candidate,
        settings=settings,
        device_map=m.device_map,
        tokenizer_source=source,
        integrity=True,
        foreign=foreign,
        portable=m.output.compat,
        gguf=_gguf_file(job),
        llama_cpp=job.llama_cpp,
        eval_data=job.eval_data,
        eval_progress=eval_progress,
    )
    report.context.update(provenance(job))
    return report


def run_merge(manifest_path: str | Path, progress: Progress | None = None, verify: bool = True) -> Path:
    """Plan, merge, verify and publish the release a manifest describes; return the output folder."""
    return execute(prepare(manifest_path, hash_inputs=True), progress, verify).output


def resolve_device(device_map: str) -> torch.device:
    """Where the merge math runs: cpu, cuda, cuda:N, or auto (a GPU when there is one)."""
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_map.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"`device_map: {device_map}` but no CUDA device is available; use `cpu` or `auto`")
        device = torch.device(device_map)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"`device_map: {device_map}` but only {torch.cuda.device_count()} CUDA devices exist")
        return device
    return torch.device("cpu")
