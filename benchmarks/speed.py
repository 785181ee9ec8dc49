"""Wall time and peak RSS of `mergekit-lite merge` against `cp -r` and PEFT's merge, on synthetic
bf16 Llama-style checkpoints (rank-16 LoRA on every linear layer), measured in the same run.

Each repetition runs the tools one after the other (alternating, so that drifts in the
machine's state hit all of them), each in a fresh process; the table shows medians. Before every
run the base is read once (warm page cache: dropping the cache needs privileges this does not
assume), and after it the output is deleted and the disk synced, so that no run pays for the
write-back of the one before.

    .venv/bin/python benchmarks/speed.py                    # about 1, 2 and 6 GB, 3 repetitions
    .venv/bin/python benchmarks/speed.py --sizes 2 --repeat 5 --tools cp mergekit

The floor of a first run is measured in the same run: `cp+sync` (the copy fsync'd, as
mergekit-lite's atomic publish does with its output) and `sha256` (benchmarks/sha256_bound.py: the
weights hashed twice, the inputs' stream and the output's on a thread each, as a merge must for its
receipt and SHA256SUMS); the floor is the larger of the two. The "x cp" ratios are against plain
`cp -r`. mergekit-lite runs four ways: `mergekit` (the first run: --no-verify, an empty cache, so
every input is hashed for the receipt and transformers is imported to name the embeddings),
`mk-cached` (the rerun: --no-verify, the inputs' digests and the architecture known from an earlier
run on the same files: a nightly job's case), `mk+gate-first` and `mk+gate` (the same two gated: the
gate's streamed checks -- structure, per-tensor algebra and every element, packaging -- with
`verify.logits: false`: the end-to-end check loads two float32 copies of the model, 24 GB for the
6 GB checkpoint, more than these machines have). CPU seconds (user + system) are shown beside the
wall times: on a machine other work shares, they move far less with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
TOOLS = ("cp", "cp+sync", "sha256", "peft", "mergekit", "mk-cached", "mk+gate-first", "mk+gate")
LABELS = {"mergekit": "first run", "mk-cached": "rerun", "mk+gate-first": "gated first run", "mk+gate": "gated rerun"}
# targets from the performance issues (7 and 20), for the 6 GB checkpoint (checked at every size, printed as such)
MAX_VS_CP, MIN_VS_PEFT, MAX_RSS_GIB, MAX_RSS_VS_PEFT = 1.5, 6.0, 0.75, 1 / 8
MAX_GATED_VS_UNGATED, MAX_FIRST_VS_FLOOR = 1.25, 1.3


@dataclass
class Runs:
    wall: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)  # GiB
    cpu: list[float] = field(default_factory=list)  # user + system seconds
    stages: dict[str, float] = field(default_factory=dict)  # seconds per pipeline stage, one extra run

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_rss(self) -> float:
        return statistics.median(self.rss)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def build(size: float) -> Path:
    """Build (once) the checkpoint and adapter in a child process, and write the manifest."""
    folder = WORK / f"llama-{size:g}GB"
    subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(folder), str(size)], check=True)
    (folder / "manifest.yaml").write_text(
        "base: ./base\nadapters: [./adapter]\ndtype: bfloat16\ntokenizer: none\noutput: ./merged\n"
    )
    return folder


def commands(folder: Path) -> dict[str, list[str]]:
    out = str(folder / "merged")
    merge = [sys.executable, "-m", "mergekit_lite", "merge", "--quiet"]
    gated = folder / "manifest-gate.yaml"  # the streamed checks (structure, algebra, packaging), no logits
    gated.write_text((folder / "manifest.yaml").read_text() + "verify: {logits: false}\n")
    return {
        "cp": ["cp", "-r", str(folder / "base"), out],
        # what mergekit-lite's atomic publish also does: the copy on disk (fsync'd) before it returns
        "cp+sync": ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(folder / "base"), out],
        "sha256": [sys.executable, str(HERE / "sha256_bound.py"), str(folder / "base"), out],
        "peft": [sys.executable, str(HERE / "peft_merge.py"), str(folder / "base"), str(folder / "adapter"), out],
        "mergekit": [*merge, "--no-verify", str(folder / "manifest.yaml")],
        "mk-cached": [*merge, "--no-verify", str(folder / "manifest.yaml")],
        "mk+gate-first": [*merge, str(gated)],
        "mk+gate": [*merge, str(gated)],
    }


def digest_cache(tool: str, folder: Path) -> str:
    """MERGEKIT_LITE_CACHE for a run: `mergekit` and `mk+gate-first` start with an empty cache every
    time (they hash every input and build the architecture on the meta device, as a first run does);
    `mk-cached` and `mk+gate` use one the first run of the size filled (a rerun on the same base: the
    inputs' digests and the embedding names are known)."""
    if tool in ("mergekit", "mk+gate-first"):
        fresh = folder / "digests-cold"
        shutil.rmtree(fresh, ignore_errors=True)
        return str(fresh)
    return str(folder / "digests-warm")


def warm(folder: Path) -> None:
    """Read the base checkpoint once so that every tool starts from a warm page cache."""
    buffer = bytearray(16 * 2**20)
    for path in sorted((folder / "base").iterdir()):
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass


def measure(command: list[str], output: Path, cache: str = "off", cwd: Path = HERE.parent) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of `command` in a fresh process started in `cwd`, which must
    create `output`."""
    wall, peak, _ = measure_usage(command, output, cache, cwd)
    return wall, peak


def measure_usage(
    command: list[str], output: Path, cache: str = "off", cwd: Path = HERE.parent
) -> tuple[float, float, float]:
    """`measure`, and the CPU seconds (user + system) the process used: on a machine other work
    shares, CPU time moves far less with the load than wall time does."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MERGEKIT_LITE_CACHE=cache)
    with tempfile.TemporaryFile() as errors:  # progress bars and warnings, shown only on failure
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0 or not output.exists():
            errors.seek(0)
            sys.stderr.write(errors.read().decode(errors="replace")[-4000:])
            raise SystemExit(f"failed: {' '.join(command)}")
    return wall, usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime  # maxrss: KiB on Linux


def clean(output: Path) -> None:
    shutil.rmtree(output, ignore_errors=True)
    os.sync()
    time.sleep(1)


def stages(folder: Path) -> dict[str, float]:
    """Seconds per pipeline stage of one more mergekit-lite run (benchmarks/stages.py), not in the medians."""
    warm(folder)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["MERGEKIT_LITE_CACHE"] = digest_cache("mergekit", folder)
    done = subprocess.run(
        [sys.executable, str(HERE / "stages.py"), str(folder / "manifest.yaml")],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    clean(folder / "merged")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_size(size: float, tools: list[str], repeat: int, with_stages: bool) -> tuple[float, dict[str, Runs]]:
    folder = build(size)
    model_gb = sum(p.stat().st_size for p in (folder / "base").glob("*.safetensors")) / 1e9
    cmds = commands(folder)
    runs = {tool: Runs() for tool in tools}
    clean(folder / "merged")
    if {"mk-cached", "mk+gate"} & set(tools):  # fill the warm digest cache (not timed)
        measure(cmds["mk-cached"], folder / "merged", digest_cache("mk-cached", folder))
        clean(folder / "merged")
    for rep in range(repeat):
        for tool in tools:
            warm(folder)
            wall, rss, cpu = measure_usage(cmds[tool], folder / "merged", digest_cache(tool, folder))
            runs[tool].wall.append(wall)
            runs[tool].rss.append(rss)
            runs[tool].cpu.append(cpu)
            print(
                f"  {size:g} GB  run {rep + 1}/{repeat}  {tool:13s} {wall:7.2f} s  CPU {cpu:7.2f} s  {rss:6.2f} GiB",
                file=sys.stderr,
            )
            clean(folder / "merged")
    if "mergekit" in runs and with_stages:
        runs["mergekit"].stages = stages(folder)
    return model_gb, runs


def report(results: dict[float, tuple[float, dict[str, Runs]]], repeat: int) -> None:
    print(
        f"\nwarm cache (base read before every run; output deleted and synced after); "
        f"median of {repeat}, runs alternating; {os.cpu_count()} CPUs"
    )
    print(
        f"{'model':>8} {'tool':>13} {'':>15} {'wall s':>8} {'(min-max)':>13} {'CPU s':>7} {'peak RSS GiB':>13} "
        f"{'x cp':>6} {'x floor':>8} {'PEFT/x':>7} {'RSS/PEFT':>9}"
    )
    for _size, (model_gb, runs) in results.items():
        cp = runs["cp"].median_wall if "cp" in runs else None
        floor = _floor(runs)
        peft = runs["peft"] if "peft" in runs else None
        for tool, r in runs.items():
            vs_cp = f"{r.median_wall / cp:6.2f}" if cp else f"{'-':>6}"
            vs_floor = f"{r.median_wall / floor:8.2f}" if floor else f"{'-':>8}"
            vs_peft = f"{peft.median_wall / r.median_wall:7.2f}" if peft else f"{'-':>7}"
            rss_peft = f"{r.median_rss / peft.median_rss:9.3f}" if peft else f"{'-':>9}"
            spread = f"({min(r.wall):.1f}-{max(r.wall):.1f})"
            print(
                f"{model_gb:>6.2f}GB {tool:>13} {LABELS.get(tool, ''):>15} {r.median_wall:>8.2f} {spread:>13} "
                f"{r.median_cpu:>7.2f} {r.median_rss:>13.2f} {vs_cp} {vs_floor} {vs_peft} {rss_peft}"
            )
    print(
        "\ntargets (issues 7 and 20, for the 6 GB checkpoint): first run <= 1.3 x the floor (the larger of "
        "cp+sync and sha256) and >= 6 x faster than PEFT; gated <= 1.25 x ungated; peak RSS <= 0.75 GiB in "
        "every mode, flat as the model grows"
    )
    for _size, (model_gb, runs) in results.items():
        floor = _floor(runs)
        for tool in ("mergekit", "mk-cached", "mk+gate-first", "mk+gate"):
            if tool not in runs:
                continue
            m = runs[tool]
            checks = [f"RSS {m.median_rss:.2f} GiB {_ok(m.median_rss <= MAX_RSS_GIB)}"]
            if tool == "mergekit" and floor:
                ratio = m.median_wall / floor
                checks.append(f"x floor {ratio:.2f} {_ok(ratio <= MAX_FIRST_VS_FLOOR)}")
            if tool == "mergekit" and "peft" in runs:
                speedup = runs["peft"].median_wall / m.median_wall
                share = m.median_rss / runs["peft"].median_rss
                checks.append(f"PEFT/x {speedup:.1f} {_ok(speedup >= MIN_VS_PEFT)}")
                checks.append(f"RSS/PEFT {share:.3f} {_ok(share <= MAX_RSS_VS_PEFT)}")
            ungated = {"mk+gate-first": "mergekit", "mk+gate": "mk-cached"}.get(tool)
            if ungated in runs:
                ratio = m.median_wall / runs[ungated].median_wall
                cpu = m.median_cpu / runs[ungated].median_cpu
                checks.append(f"x ungated {ratio:.2f} {_ok(ratio <= MAX_GATED_VS_UNGATED)} (CPU x {cpu:.2f})")
            print(f"  {model_gb:.2f} GB {LABELS[tool]:>15}: " + ", ".join(checks))
    print("\nmergekit-lite merge --no-verify, seconds per stage (one extra run per size):")
    for _size, (model_gb, runs) in results.items():
        if "mergekit" in runs and runs["mergekit"].stages:
            print(f"  {model_gb:.2f} GB: " + ", ".join(f"{k} {v:.1f}" for k, v in runs["mergekit"].stages.items()))
    sizes = [s for s in results if "mergekit" in results[s][1]]
    if len(sizes) > 1:
        small, large = results[sizes[0]], results[sizes[-1]]
        growth = large[1]["mergekit"].median_rss / small[1]["mergekit"].median_rss
        print(f"  mergekit peak RSS, largest / smallest model: {growth:.2f} (models {large[0] / small[0]:.1f}x apart)")


def _floor(runs: dict[str, Runs]) -> float | None:
    """The floor of a first run: the larger of the copy (fsync'd) and the SHA-256 of inputs and output."""
    parts = [runs[t].median_wall for t in ("cp+sync", "sha256") if t in runs]
    return max(parts) if parts else None


def _ok(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 2.0, 6.0], help="checkpoint sizes in GB")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool per size (median reported)")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS), help="which tools to run")
    parser.add_argument(
        "--no-stages",
        dest="stages",
        action="store_false",
        help="skip the extra mergekit-lite run that times each pipeline stage",
    )
    args = parser.parse_args()
    tools = [t for t in TOOLS if t in args.tools]
    results = {size: run_size(size, tools, args.repeat, args.stages) for size in args.sizes}
    report(results, args.repeat)


if __name__ == "__main__":
    main()
