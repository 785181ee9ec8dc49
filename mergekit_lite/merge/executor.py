"""Where the shards of a merge are computed: threads of this process, worker processes, or Ray tasks.

Output shards are independent of each other. A worker gets plain data (the plan, the base
checkpoint's tensor table, the adapters' tensor tables: paths and offsets, no tensor data) and the
staging folder, reads the inputs itself, writes its shard file into the staging folder, and
reports the file's name, size and SHA-256. The driver alone collects those reports, checks that it
sees each file at the reported size, and goes on to write the index, run the gate and publish.

Every executor runs merge.write_shard's code on the same plan, so the same inputs give
byte-identical shards whichever is chosen (the tests compare them).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mergekit_lite.errors import InputError, MergeError, MergekitError
from mergekit_lite.io.format import TensorEntry
from mergekit_lite.io.reader import TensorReader
from mergekit_lite.io.writer import Written
from mergekit_lite.manifest.sections import ExecutorSpec
from mergekit_lite.merge.merge import Progress, ShardFile, write_shard, write_shards
from mergekit_lite.plan.plan import Plan
from mergekit_lite.sources.adapter import Adapter

RAY_MISSING = '`executor: ray` needs Ray, which is not installed here: pip install "mergekit-lite[ray]"'
CANCEL_WAIT_S = 60  # after a failure, how long the driver waits for cancelled Ray tasks to stop writing


@dataclass(frozen=True)
class ShardWork:
    """What a worker needs to write any shard of the plan: plain, picklable data."""

    plan: Plan
    base: dict[str, TensorEntry]  # the base checkpoint's tensor table
    adapters: list[Adapter]
    folder: Path  # the staging folder: shared storage for workers on other machines
    device: str  # where the merge math runs, as torch names it


def check_available(spec: ExecutorSpec) -> None:
    """Refuse an executor that cannot run here (Ray not installed) before anything is written."""
    if spec.kind == "ray":
        _import_ray()


def run_shards(
    spec: ExecutorSpec,
    plan: Plan,
    base: dict[str, TensorEntry],
    adapters: list[Adapter],
    folder: Path,
    device: torch.device,
    *,
    progress: Progress | None = None,
    digests: dict[str, str] | None = None,
    written: Written | None = None,
) -> list[Path]:
    """Write every shard of the plan into `folder` with the executor `spec` names; return the paths in order.

    `progress` is called for each tensor: as it is written (local), or when its shard is done
    (processes, ray). With `digests`, each shard's SHA-256 is put there under its file name, as
    merge.write_shards does. On an error the partial shards are left for the caller's staging
    folder to remove; no worker is still writing when this returns or raises. `written` is told
    each write as it lands (the local executor only: the gate's checks in flight follow it).
    """
    if spec.kind == "local":
        return write_shards(plan, TensorReader(base), adapters, folder, device, progress, digests, written)
    work = ShardWork(plan, base, adapters, folder, str(device))
    written = _in_processes(spec, work, progress) if spec.kind == "processes" else _on_ray(spec, work, progress)
    check_written(written, plan, folder)
    if digests is not None:
        digests.update({f.name: f.sha256 for f in written if f.sha256 is not None})
    return [folder / f.name for f in written]


def merge_one(work: ShardWork, index: int, threads: int) -> ShardFile:
    """A worker's job: write shard `index` of the plan into the shared staging folder."""
    torch.set_num_threads(threads)
    _check_reachable(work, index)
    return write_shard(work.plan, index, TensorReader(work.base), work.adapters, work.folder, torch.device(work.device))


def check_written(written: list[ShardFile], plan: Plan, folder: Path) -> None:
    """The driver's check of the workers' reports: every planned shard, in order, present here at its size."""
    names = [f.name for f in written]
    if names != plan.shard_names:
        raise MergeError(f"internal error: the workers wrote {names}, the plan has {plan.shard_names}")
    for f in written:
        try:
            size = (folder / f.name).stat().st_size
        except FileNotFoundError:
            size = None
        if size != f.size:
            seen = "is missing" if size is None else f"has {size} bytes"
            raise MergeError(
                f"a worker wrote `{f.name}` ({f.size} bytes) but here it {seen} in `{folder}`: the output folder "
                "must be on storage that the driver and every worker share; nothing was published"
            )


def _in_processes(spec: ExecutorSpec, work: ShardWork, progress: Progress | None) -> list[ShardFile]:
    """One task per shard on a pool of spawned processes (forking after torch has started threads is unsafe)."""
    n = len(work.plan.shard_names)
    cores = _cores()
    workers = min(spec.workers or cores, n)
    threads = max(1, cores // workers)
    written: dict[int, ShardFile] = {}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(merge_one, work, i, threads): i for i in range(n)}
        for future in as_completed(futures):
            index = futures[future]
            try:
                written[index] = future.result()
            except BrokenProcessPool:
                raise MergeError(_died(work, [i for i in range(n) if i not in written], "a worker process")) from None
            _shard_done(work.plan, index, progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # running shards finish; nothing writes after this
    return [written[i] for i in range(n)]


def _on_ray(spec: ExecutorSpec, work: ShardWork, progress: Progress | None) -> list[ShardFile]:
    """One Ray task per shard, at most `spec.workers` in flight; the inputs go to the object store once."""
    ray = _import_ray()
    started = _connect(ray, spec.address)
    try:
        cpus = spec.cpus_per_worker or 1
        gpus = 1 if work.device.startswith("cuda") else 0  # a task sees the GPU Ray gives it as `cuda`
        task = ray.remote(merge_one).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        shared = ray.put(replace(work, device="cuda" if gpus else work.device))
        n = len(work.plan.shard_names)
        queue, pending, written = deque(range(n)), {}, {}
        try:
            while queue or pending:
                while queue and len(pending) < (spec.workers or n):
                    index = queue.popleft()
                    pending[task.remote(shared, index, cpus)] = index
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ready)
                written[index] = _ray_result(ray, ready, work, index)
                _shard_done(work.plan, index, progress)
        finally:
            for ref in pending:  # after a failure: stop the others (killing their workers) before returning
                ray.cancel(ref, force=True)
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
        return [written[i] for i in range(n)]
    finally:
        if started:
            ray.shutdown()


def _ray_result(ray: ModuleType, ref: Any, work: ShardWork, index: int) -> ShardFile:
    """A task's report; its error as the same clean error a local merge raises, or a MergeError naming the shard."""
    name = work.plan.shard_names[index]
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, (MergekitError, OSError)):
            raise cause from None
        if isinstance(cause, ImportError):
            raise InputError(
                f"a Ray worker cannot import mergekit-lite ({cause}): install the same version of "
                "mergekit-lite on every node of the cluster"
            ) from None
        raise MergeError(
            f"merging `{name}` failed on a Ray worker: {type(cause).__name__}: {cause}; nothing was published"
        ) from None
    except ray.exceptions.RayError as exc:
        raise MergeError(_died(work, [index], f"the Ray worker ({type(exc).__name__})")) from None


def _died(work: ShardWork, unfinished: list[int], who: str) -> str:
    """A worker died (killed, out of memory): name the shards it may have been writing."""
    started = [i for i in unfinished if (work.folder / work.plan.shard_names[i]).exists()] or unfinished[:1]
    names = ", ".join(f"`{work.plan.shard_names[i]}`" for i in started)
    return f"{who} died (killed, or out of memory?) while merging {names}; nothing was published"


def _shard_done(plan: Plan, index: int, progress: Progress | None) -> None:
    if progress is not None:
        for t in plan.tensors:
            if t.shard == index:
                progress(t)


def _check_reachable(work: ShardWork, index: int) -> None:
    """Every file the shard reads, and the staging folder, as this worker sees them."""
    needed = {work.base[t.source].file for t in work.plan.tensors if t.shard == index}
    needed |= {k.entry.file for a in work.adapters for k in a.keys}  # a file or two per adapter
    for path in sorted(needed) + [work.folder]:
        if not path.exists():
            raise InputError(
                f"a worker on `{socket.gethostname()}` cannot see `{path}`: every worker must reach the inputs "
                "and the output folder at the same paths (shared storage)"
            )


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    return ray


def _connect(ray: ModuleType, address: str | None) -> bool:
    """Connect this driver to Ray unless it already is; True when this call connected (and must disconnect)."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address in (None, "local"):
        options["include_dashboard"] = False  # only for an instance started here
    try:
        ray.init(address=address, **options)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
        where = f"`{address}`" if address else "RAY_ADDRESS (or a new local instance)"
        raise InputError(f"cannot connect to the Ray cluster at {where}: {exc}") from None
    return True


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
