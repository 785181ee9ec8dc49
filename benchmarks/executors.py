"""Wall time and peak memory of `mergekit-lite merge --no-verify` with `executor: processes` (2 workers)
against `executor: local`, on the synthetic bf16 Llama-style checkpoint of ~2 GB (benchmarks/synthetic.py),
with the output cut into shards of `--shard` bytes so that the workers have shards to share.

Each repetition runs the executors one after the other (alternating, so that drifts in the machine's
state hit all of them), each in a fresh process, from a warm page cache, the output deleted and synced
after each run (as benchmarks/speed.py does). Peak memory is given two ways: the largest single
process (what wait4 reports) and the whole process tree (driver + workers), sampled every 20 ms from
/proc: with worker processes the second is the one that counts. The shards of every run are hashed
and must be byte-identical across executors.

    .venv/bin/python benchmarks/executors.py                       # 2 GB, 500 MB shards, 3 repetitions
    .venv/bin/python benchmarks/executors.py --executors local processes ray --repeat 5

`ray` (optional, needs `pip install "mergekit-lite[ray]"`) starts a one-machine Ray instance inside
each run, bound to the loopback interface; its start-up is part of its time.

    .venv/bin/python benchmarks/executors.py --plan-405b          # the plan of a 405B merge, no data

`--plan-405b` writes a header-only checkpoint with Llama-3.1-405B's shapes (bf16, sparse files: no
disk used) and a rank-16 LoRA on every linear layer, builds mergekit-lite's plan from the headers,
and prints the figures docs/scaling.md works from: output shards, bytes, and the merge's predicted
peak memory per worker.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from speed import warm  # the same warm page cache as the speed benchmark (this folder is on sys.path)

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
EXECUTORS = {
    "local": "local",
    "processes": "{kind: processes, workers: 2}",
    "ray": "{kind: ray, address: local, workers: 2}",
}


@dataclass
class Runs:
    wall: list[float] = field(default_factory=list)
    largest: list[float] = field(default_factory=list)  # GiB, the largest single process
    tree: list[float] = field(default_factory=list)  # GiB, all processes of the run at once
    digests: set[str] = field(default_factory=set)


def build(size: float, shard: str) -> tuple[Path, dict[str, Path]]:
    """The checkpoint (built once, in a child process) and one manifest per executor."""
    folder = WORK / f"llama-{size:g}GB"
    subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(folder), str(size)], check=True)
    manifests = {}
    for name, spec in EXECUTORS.items():
        path = folder / f"manifest-{name}.yaml"
        path.write_text(
            f"base: ./base\nadapters: [./adapter]\ndtype: bfloat16\ntokenizer: none\n"
            f"output: {{path: ./merged, max_shard_size: {shard}}}\nexecutor: {spec}\n"
        )
        manifests[name] = path
    return folder, manifests


def _tree_rss(root: int) -> int:
    """Bytes resident in `root` and all its descendants now (from /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += [p for p, parent in parents.items() if parent == pid]
    return total


def measure(manifest: Path, output: Path) -> tuple[float, float, float]:
    """(wall s, peak RSS of the largest process in GiB, peak RSS of the process tree in GiB)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    command = [sys.executable, "-m", "mergekit_lite", "merge", "--quiet", "--no-verify", str(manifest)]
    peak = [0]
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=env, cwd=HERE.parent)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], _tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        if os.waitstatus_to_exitcode(status) != 0 or not output.exists():
            errors.seek(0)
            sys.stderr.write(errors.read().decode(errors="replace")[-4000:])
            raise SystemExit(f"failed: {' '.join(command)}")
    return wall, usage.ru_maxrss / 2**20, peak[0] / 2**30


def shards_digest(output: Path) -> str:
    total = hashlib.sha256()
    for path in sorted(output.glob("*.safetensors")):
        total.update(path.name.encode())
        with open(path, "rb") as fh:
            total.update(hashlib.file_digest(fh, "sha256").digest())
    return total.hexdigest()


def clean(output: Path) -> None:
    shutil.rmtree(output, ignore_errors=True)
    os.sync()
    time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=2.0, help="checkpoint size in GB")
    parser.add_argument("--shard", default="500MB", help="max_shard_size of the output")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each executor (median reported)")
    parser.add_argument("--executors", nargs="+", choices=list(EXECUTORS), default=["local", "processes"])
    parser.add_argument("--plan-405b", action="store_true", help="print the plan of a 405B merge and stop")
    args = parser.parse_args()
    if args.plan_405b:
        plan_405b()
        return
    folder, manifests = build(args.size, args.shard)
    output = folder / "merged"
    model_gb = sum(p.stat().st_size for p in (folder / "base").glob("*.safetensors")) / 1e9
    runs = {name: Runs() for name in args.executors}
    load_before = os.getloadavg()
    clean(output)
    for rep in range(args.repeat):
        for name in args.executors:
            warm(folder)
            wall, largest, tree = measure(manifests[name], output)
            r = runs[name]
            r.wall.append(wall)
            r.largest.append(largest)
            r.tree.append(tree)
            r.digests.add(shards_digest(output))
            shards = len(list(output.glob("*.safetensors")))
            print(
                f"  run {rep + 1}/{args.repeat}  {name:9s} {wall:6.2f} s  largest {largest:5.2f} GiB  "
                f"tree {tree:5.2f} GiB  ({shards} shards)",
                file=sys.stderr,
            )
            clean(output)
    load_after = os.getloadavg()
    print(
        f"\n{model_gb:.2f} GB bf16 checkpoint, output shards of at most {args.shard}; warm cache; "
        f"median of {args.repeat}, runs alternating; {os.cpu_count()} CPUs; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs share this machine)"
    )
    print(
        f"{'executor':>10} {'wall s':>8} {'(min-max)':>13} {'peak RSS GiB':>13} {'tree RSS GiB':>13} "
        f"{'wall/local':>11} {'tree RSS/local':>15}"
    )
    base = runs.get("local")
    for name, r in runs.items():
        wall, tree = statistics.median(r.wall), statistics.median(r.tree)
        ratio = f"{wall / statistics.median(base.wall):11.2f}" if base else f"{'-':>11}"
        rss_ratio = f"{tree / statistics.median(base.tree):15.2f}" if base else f"{'-':>15}"
        spread = f"({min(r.wall):.1f}-{max(r.wall):.1f})"
        print(
            f"{name:>10} {wall:>8.2f} {spread:>13} {statistics.median(r.largest):>13.2f} {tree:>13.2f} {ratio} {rss_ratio}"
        )
    digests = set().union(*(r.digests for r in runs.values()))
    print(f"\nshards byte-identical across every run and executor: {'yes' if len(digests) == 1 else 'NO'}")


# Llama-3.1-405B's shapes (its config.json): hidden 16384, MLP 53248, 126 layers, 128 heads, 8 KV heads
L405 = {"hidden": 16384, "intermediate": 53248, "layers": 126, "heads": 128, "kv_heads": 8, "vocab": 128256}


def _sparse_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors file with a real header and a hole where the data would be (no disk used)."""
    from mergekit_lite.io.format import ITEMSIZE, encode_header

    header = encode_header([(name, dtype, shape) for name, (dtype, shape) in tensors.items()], {"format": "pt"})
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + sum(math.prod(shape) * ITEMSIZE[dtype] for dtype, shape in tensors.values()))


def plan_405b(rank: int = 16, base_shard_bytes: float = 5e9) -> None:
    """Build the plan of a 405B merge from headers alone and print the figures that size a cluster."""
    import json

    from mergekit_lite.plan.build import build_plan
    from mergekit_lite.sources.adapter import read_adapter
    from mergekit_lite.sources.checkpoint import read_checkpoint

    c = L405
    h, m, kv = c["hidden"], c["intermediate"], c["hidden"] * c["kv_heads"] // c["heads"]
    linear = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (m, h),
        "mlp.up_proj": (m, h),
        "mlp.down_proj": (h, m),
    }
    order: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c["vocab"], h))]
    for i in range(c["layers"]):
        order += [
            (f"model.layers.{i}.input_layernorm.weight", (h,)),
            (f"model.layers.{i}.post_attention_layernorm.weight", (h,)),
        ]
        order += [(f"model.layers.{i}.{name}.weight", shape) for name, shape in linear.items()]
    order += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab"], h))]
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = Path(tmp) / "base", Path(tmp) / "adapter"
        base.mkdir()
        adapter.mkdir()
        files: list[dict[str, tuple[str, tuple[int, ...]]]] = [{}]
        size = 0
        for name, shape in order:
            nbytes = 2 * int(math.prod(shape))
            if size and size + nbytes > base_shard_bytes:
                files.append({})
                size = 0
            files[-1][name] = ("BF16", shape)
            size += nbytes
        weight_map = {}
        for k, tensors in enumerate(files):
            file = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
            _sparse_safetensors(base / file, tensors)
            weight_map.update(dict.fromkeys(tensors, file))
        (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (base / "config.json").write_text(
            json.dumps(
                {
                    "architectures": ["LlamaForCausalLM"],
                    "model_type": "llama",
                    "hidden_size": h,
                    "intermediate_size": m,
                    "num_hidden_layers": c["layers"],
                    "num_attention_heads": c["heads"],
                    "num_key_value_heads": c["kv_heads"],
                    "vocab_size": c["vocab"],
                    "tie_word_embeddings": False,
                    "dtype": "bfloat16",
                }
            )
        )
        factors = {}
        for i in range(c["layers"]):
            for name, (out_f, in_f) in linear.items():
                key = f"base_model.model.model.layers.{i}.{name}"
                factors[f"{key}.lora_A.weight"] = ("F32", (rank, in_f))
                factors[f"{key}.lora_B.weight"] = ("F32", (out_f, rank))
        _sparse_safetensors(adapter / "adapter_model.safetensors", factors)
        (adapter / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "bias": "none",
                    "target_modules": sorted({n.split(".")[-1] for n in linear}),
                    "init_lora_weights": True,
                }
            )
        )
        checkpoint = read_checkpoint(base)
        adapters = [read_adapter(adapter, 0, 1.0)]
        plan = build_plan(checkpoint, adapters, "bfloat16", 5 * 10**9)
        adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
        shard_bytes = [0] * len(plan.shard_names)
        for t in plan.tensors:
            shard_bytes[t.shard] += t.nbytes
        factor = {k.key: k.entry.nbytes for k in adapters[0].keys}
        per_shard_factors = [0] * len(plan.shard_names)
        for t in plan.tensors:
            per_shard_factors[t.shard] += sum(factor[key] for op in t.ops for key in op.keys)
        params = sum(math.prod(t.shape) for t in plan.tensors)
        print(
            f"405B plan (Llama-3.1-405B shapes, bf16, rank-{rank} LoRA in float32 on every linear layer), from headers only:"
        )
        print(
            f"  parameters {params / 1e9:.1f} B; base {len(checkpoint.files)} files of <= {base_shard_bytes / 1e9:g} GB; "
            f"{len(plan.tensors)} output tensors, {sum(bool(t.ops) for t in plan.tensors)} of them changed"
        )
        print(
            f"  output {plan.total_bytes / 1e9:.1f} GB in {len(plan.shard_names)} shards of <= 5 GB "
            f"(largest {max(shard_bytes) / 1e9:.2f} GB, smallest {min(shard_bytes) / 1e9:.2f} GB)"
        )
        print(
            f"  largest tensor {max(t.nbytes for t in plan.tensors) / 1e9:.2f} GB; largest changed tensor "
            f"{max(t.nbytes for t in plan.tensors if t.ops) / 1e9:.2f} GB"
        )
        print(
            f"  adapter file {adapter_bytes / 1e9:.2f} GB; factors read per shard: at most "
            f"{max(per_shard_factors) / 1e6:.0f} MB"
        )
        print(f"  predicted peak memory of one merge process (plan.peak_bytes): {plan.peak_bytes / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
