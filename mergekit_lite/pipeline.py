"""The one module that calls every stage: manifest -> plan -> merge -> package -> publish."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_lite.adapter import Adapter, read_adapter
from mergekit_lite.checkpoint import Checkpoint, read_checkpoint
from mergekit_lite.errors import InputError
from mergekit_lite.manifest import LoadedManifest, load_manifest
from mergekit_lite.merge import Progress, write_shards
from mergekit_lite.package import write_configs, write_index
from mergekit_lite.plan import Plan, build_plan
from mergekit_lite.publish import check_output, publish, staging
from mergekit_lite.reader import TensorReader


@dataclass
class Job:
    """Everything known before the first byte is written."""

    manifest: LoadedManifest
    checkpoint: Checkpoint
    adapters: list[Adapter]
    plan: Plan


def prepare(manifest_path: str | Path, for_output: bool = True) -> Job:
    """Load the manifest, read headers and configs, build the plan, and (for a merge) vet the output.

    Reads no tensor data and writes nothing; every input problem surfaces here.
    """
    loaded = load_manifest(manifest_path)
    m = loaded.manifest
    checkpoint = read_checkpoint(loaded.base_path)
    adapters = [read_adapter(p, i, spec.weight) for i, (p, spec) in enumerate(zip(loaded.adapter_paths, m.adapters))]
    plan = build_plan(checkpoint, adapters, m.dtype, loaded.max_shard_bytes)
    resolve_device(m.device_map)
    if for_output:
        inputs = [loaded.base_path, *loaded.adapter_paths]
        check_output(loaded.output_path, inputs, m.output.overwrite, plan.total_bytes)
    return Job(loaded, checkpoint, adapters, plan)


def run_plan(manifest_path: str | Path) -> Plan:
    """The plan for a manifest (a dry run that also vets the output location)."""
    return prepare(manifest_path).plan


def execute(job: Job, progress: Progress | None = None) -> Path:
    """Merge into a staging folder and publish it at the output path; return that path."""
    loaded = job.manifest
    output = loaded.output_path
    overwrite = loaded.manifest.output.overwrite
    device = resolve_device(loaded.manifest.device_map)
    with staging(output) as stage:
        base = TensorReader(job.checkpoint.tensors)
        write_shards(job.plan, base, job.adapters, stage, device, progress)
        write_index(stage, job.plan)
        write_configs(stage, job.checkpoint.path, job.checkpoint.config, job.plan)
        publish(stage, output, overwrite)
    return output


def run_merge(manifest_path: str | Path, progress: Progress | None = None) -> Path:
    """Plan, merge and publish the release a manifest describes; return the output folder."""
    return execute(prepare(manifest_path), progress)


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
