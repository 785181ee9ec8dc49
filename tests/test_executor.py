"""Executors: the same shards whether merged on threads, worker processes or Ray tasks; a worker's
errors surface as the same clean errors as a local merge's; the end-to-end check gives the same
figures with its models offloaded to disk.

One local Ray instance serves the whole module (so the session: no other file starts one), bound
to the loopback interface only, and is shut down at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergekit_lite.pipeline as pipeline_module
from mergekit_lite.cli import main
from mergekit_lite.errors import ManifestError, MergeError
from mergekit_lite.manifest.load import load_manifest
from mergekit_lite.manifest.sections import ExecutorSpec
from mergekit_lite.merge.executor import RAY_MISSING, run_shards
from mergekit_lite.pipeline import prepare, run_merge, verify_release

from helpers import INDEX_NAME, write_manifest

LOCAL = {"kind": "local"}
PROCESSES = {"kind": "processes", "workers": 2}
RAY = {"kind": "ray"}
REMOTE = [pytest.param(PROCESSES, id="processes"), pytest.param(RAY, id="ray")]
# (case, dtype, max_shard_size, combine): linear deltas by row blocks over two adapters; DoRA's
# whole-tensor path; a DARE combination, whose random masks each worker must draw alike
IDENTITY_CASES = [
    pytest.param("two_weighted", "float32", "24KB", None, id="two_weighted-float32"),
    pytest.param("dora", "bfloat16", "12KB", None, id="dora-bfloat16"),
    pytest.param("lora_twice", "bfloat16", "12KB", {"method": "dare_ties", "density": 0.5, "seed": 3}, id="dare_ties"),
]
TWICE = [("llama_lora", 0.7), ("llama_lora", -0.4)]  # `lora_twice`: one adapter twice, for a combination


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-CPU Ray instance on this machine, its servers on 127.0.0.1 only, for this module."""
    # Ray's switch for single-machine instances: with it off, every server binds the loopback address
    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved


def _use(executor: dict, request: pytest.FixtureRequest) -> None:
    if executor["kind"] == "ray":
        request.getfixturevalue("ray_cluster")


def _manifest(
    folder: Path,
    zoo,
    case_id: str,
    dtype: str,
    shard: str,
    executor: dict | str | None = None,
    verify: dict | None = None,
    adapters: list[tuple[Path, float | None]] | None = None,
    combine: dict | None = None,
) -> Path:
    from builders import CASES_BY_ID

    case = CASES_BY_ID["lora" if case_id == "lora_twice" else case_id]
    pairs = TWICE if case_id == "lora_twice" else case.adapters
    adapters = adapters or [(zoo.adapter(name), weight) for name, weight in pairs]
    return write_manifest(
        folder,
        zoo.base(case.base),
        adapters,
        dtype,
        max_shard_size=shard,
        executor=executor,
        verify=verify,
        combine=combine,
    )


def _weights(folder: Path) -> dict[str, bytes]:
    """Every shard and the index of a release, as bytes."""
    return {p.name: p.read_bytes() for p in sorted([*folder.glob("*.safetensors"), folder / INDEX_NAME])}


def _sha256sums(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


@pytest.fixture(scope="module")
def local_release(zoo, tmp_path_factory):
    """The release of each identity case merged by the local executor (cached)."""
    done: dict[tuple[str, str, str], Path] = {}

    def get(case_id: str, dtype: str, shard: str, combine: dict | None = None) -> Path:
        key = (case_id, dtype, json.dumps(combine))
        if key not in done:
            folder = tmp_path_factory.mktemp(f"local-{case_id}")
            done[key] = run_merge(_manifest(folder, zoo, case_id, dtype, shard, combine=combine))
        return done[key]

    return get


@pytest.mark.parametrize("executor", REMOTE)
@pytest.mark.parametrize("case_id,dtype,shard,combine", IDENTITY_CASES)
def test_shards_are_byte_identical_to_local(
    executor, case_id, dtype, shard, combine, zoo, local_release, tmp_path, request
):
    _use(executor, request)
    local = local_release(case_id, dtype, shard, combine)
    out = run_merge(_manifest(tmp_path, zoo, case_id, dtype, shard, executor, combine=combine))
    ours = _weights(out)
    assert len(ours) > 3, "the model should be split into several shards"
    assert ours == _weights(local)
    # the workers' digests went into SHA256SUMS, and they are the files' own
    sums = _sha256sums(out)
    assert {name: sums[name] for name in ours} == {
        name: hashlib.sha256(data).hexdigest() for name, data in ours.items()
    }
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] and {c["group"] for c in report["checks"]} >= {"structure", "algebra", "end_to_end"}


def test_byte_comparison_can_fail(zoo, local_release, tmp_path):
    """Negative control: a merge with one adapter weight changed is not byte-identical."""
    case_id, dtype, shard, _ = IDENTITY_CASES[0].values
    adapters = [(zoo.adapter("llama_lora"), 0.7), (zoo.adapter("llama_lora_b"), -0.31)]
    out = run_merge(_manifest(tmp_path, zoo, case_id, dtype, shard, verify={"enabled": False}, adapters=adapters))
    local = _weights(local_release(case_id, dtype, shard))
    ours = _weights(out)
    assert ours.keys() == local.keys()
    assert ours != local


def _nan_adapter(zoo, folder: Path) -> tuple[Path, str]:
    """A copy of llama_lora with one NaN in a factor; returns the folder and the key."""
    src = zoo.adapter("llama_lora")
    bad = folder / "nan_lora"
    shutil.copytree(src, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[-1]  # a late layer: not in the first shard
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    return bad, key


@pytest.mark.parametrize("executor", [pytest.param(LOCAL, id="local"), *REMOTE])
def test_an_input_error_in_a_worker_is_the_same_clean_line(executor, zoo, tmp_path, monkeypatch, request):
    """With the up-front check of adapter values out of the way, the merge itself finds the NaN:
    on a worker it must still be exit 2 with the same one line, and nothing published."""
    _use(executor, request)
    bad, key = _nan_adapter(zoo, tmp_path)
    manifest = _manifest(tmp_path, zoo, "lora", "float32", "24KB", executor, adapters=[(bad, None)])
    monkeypatch.setattr(pipeline_module, "check_adapter_values", lambda adapters: None)
    result = CliRunner().invoke(main, ["merge", "--quiet", str(manifest)])
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip().splitlines()[-1] == f"error: adapter 0 (`nan_lora`): `{key}` contains NaN or Inf values"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml", "nan_lora"], "nothing is left behind"


def _worker_pids(kind: str) -> list[int]:
    if kind == "processes":
        return [p.pid for p in multiprocessing.active_children()]
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::merge_one"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("kind", ["processes", "ray"])
def test_a_killed_worker_is_a_merge_error_naming_its_shard(kind, zoo, tmp_path, request):
    """One base tensor of shard 3 is read from a FIFO that nobody writes: the worker blocks there,
    its shard file open, until the test kills it."""
    _use({"kind": kind}, request)
    job = prepare(_manifest(tmp_path, zoo, "lora", "float32", "24KB"), for_output=False)
    plan, index = job.plan, 2
    victim = next(t for t in plan.tensors if t.shard == index)
    fifo = tmp_path / "stuck.safetensors"
    os.mkfifo(fifo)
    base = dict(job.checkpoint.tensors)
    base[victim.source] = replace(base[victim.source], file=fifo)
    stage = tmp_path / "stage"
    stage.mkdir()
    shard = stage / plan.shard_names[index]
    killed: list[int] = []

    def kill_when_stuck() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if shard.exists():
                for pid in _worker_pids(kind):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)
        if not killed:  # never hang the suite: unblock the reader, which then fails on a short file
            with open(fifo, "wb"):
                pass

    killer = threading.Thread(target=kill_when_stuck, daemon=True)
    killer.start()
    with pytest.raises(MergeError) as caught:
        run_shards(ExecutorSpec(kind=kind, workers=1), plan, base, job.adapters, stage, torch.device("cpu"))
    killer.join()
    assert killed, "no worker was found to kill"
    message = str(caught.value)
    assert f"`{plan.shard_names[index]}`" in message and "died" in message and "nothing was published" in message
    assert sum(n in message for n in plan.shard_names) == 1, "only the shard being written is named"


def test_ray_missing_is_one_clean_line(zoo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    manifest = _manifest(tmp_path, zoo, "lora", "float32", "24KB", {"kind": "ray", "address": "auto"})
    result = CliRunner().invoke(main, ["merge", str(manifest)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: {RAY_MISSING}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "executor,expected",
    [
        ("local", ExecutorSpec()),
        ("processes", ExecutorSpec(kind="processes")),
        ({"kind": "processes", "workers": 3}, ExecutorSpec(kind="processes", workers=3)),
        (
            {"kind": "ray", "address": "ray://head.example:10001", "workers": 8, "cpus_per_worker": 2},
            ExecutorSpec(kind="ray", address="ray://head.example:10001", workers=8, cpus_per_worker=2),
        ),
        ({"kind": "ray", "address": "10.0.0.5:6379"}, ExecutorSpec(kind="ray", address="10.0.0.5:6379")),
    ],
)
def test_executor_forms(executor, expected, tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"base": "b", "adapters": ["a"], "output": "o", "executor": executor}))
    assert load_manifest(path).manifest.executor == expected


def test_executor_defaults_to_local(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("base: b\nadapters: [a]\noutput: o\n")
    assert load_manifest(path).manifest.executor == ExecutorSpec(kind="local")


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "executor: threads",
            "m.yaml:4: `executor.kind`: Input should be 'local', 'processes' or 'ray' (got 'threads')",
        ),
        (
            "executor: {kind: local, workers: 2}",
            "m.yaml:4: `executor`: Value error, `workers` goes with `kind: processes`",
        ),
        ("executor: {kind: processes, address: auto}", "`address` goes with `kind: ray`, not `kind: processes`"),
        ("executor: {kind: processes, cpus_per_worker: 2}", "`cpus_per_worker` goes with `kind: ray`"),
        ("executor: {kind: processes, workers: 0}", "`executor.workers`: Input should be greater than or equal to 1"),
        ("executor: {kind: ray, address: 'http://head'}", "is not a Ray address"),
        ("executor: {kind: ray, worker: 2}", "unknown key `executor.worker`; did you mean `workers`?"),
        ("verify: {max_memory: {cpu: 1GB}}", "set `verify.device_map: auto`"),
        ("verify: {offload_folder: ./off}", "set `verify.device_map: auto`"),
        ("verify: {device_map: auto, max_memory: {gpu: 1GB}}", "'gpu' is not a device"),
        ("verify: {device_map: auto, max_memory: {cpu: lots}}", "'lots' is not a size"),
        ("verify: {device_map: everywhere}", "`verify.device_map`: Value error, 'everywhere' is not one of"),
    ],
)
def test_executor_and_placement_refusals(text, message, tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(f"base: b\nadapters: [a]\noutput: o\n{text}\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert message in str(caught.value)


def test_offload_folder_is_relative_to_the_manifest(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        "base: b\nadapters: [a]\noutput: o\n"
        "verify: {device_map: auto, max_memory: {cpu: 20KB, '0': 1GB}, offload_folder: ./off}\n"
    )
    verify = load_manifest(path).manifest.verify
    assert verify.offload_folder == str(tmp_path / "off")
    assert verify.max_memory == {"cpu": "20KB", "0": "1GB"}


def _end_to_end(report) -> dict[str, object]:
    return {c.name: c.figure for c in report.checks if c.group == "end_to_end"}


def test_end_to_end_with_disk_offload_gives_the_same_figures(zoo, tmp_path, monkeypatch):
    """A CPU budget far below the model's size sends most modules to disk; the figures do not move,
    and nothing is left in the working directory (PEFT writes re-keyed copies of offloaded files
    relative to it)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = run_merge(_manifest(tmp_path / "plain", zoo, "lora", "bfloat16", "5GB"))
    plain = verify_release(tmp_path / "plain" / "manifest.yaml", against=out)
    offload = tmp_path / "offload"
    placed = _manifest(
        tmp_path / "placed",
        zoo,
        "lora",
        "bfloat16",
        "5GB",
        verify={"device_map": "auto", "max_memory": {"cpu": "20KB"}, "offload_folder": str(offload)},
    )
    report = verify_release(placed, against=out)
    assert report.passed, report.failures
    where = report.context["placement"]
    assert where["device_map"] == "auto" and where["max_memory"] == {"cpu": 20_000}
    assert "disk" in where["reference"] and "disk" in where["release"], where
    # negative control: without the budget nothing went to disk
    assert "disk" not in plain.context["placement"]["reference"] and "disk" not in plain.context["placement"]["release"]
    figures = _end_to_end(report)
    assert set(figures) == {"max_abs_logit_diff", "mean_kl", "top1_agreement", "greedy_match"}
    assert figures == _end_to_end(plain)
    assert figures["max_abs_logit_diff"] > 0, "the merge's own rounding shows: the figures are not trivially zero"
    assert not offload.exists(), "the offload folder (made for the check) is removed with what was offloaded"
    assert list(cwd.iterdir()) == [] and Path.cwd() == cwd
