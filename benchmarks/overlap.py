"""Would the gate running while the merge writes (in flight) shorten a gated merge on this machine?
An upper bound on what overlap can hide: a first-run merge (--no-verify, empty digest cache) and a
`verify` of an earlier release of the same model (the gate's checks and the read-back), each alone and
then both started at once, alternating; medians of wall and CPU seconds (user + system, both
processes together for `both`). If `both` takes as long as `merge` + `verify`, the cores have no idle
time for the gate to fill and running it in flight cannot make a gated merge faster; if it takes as
long as `merge`, it could hide the gate entirely.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/overlap.py --size 1 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = "base: ./base\nadapters: [./adapter]\ndtype: bfloat16\ntokenizer: none\nverify: {logits: false}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=1.0, help="checkpoint size in GB")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    folder = HERE / "work" / f"llama-{args.size:g}GB"
    subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(folder), str(args.size)], check=True)
    (folder / "manifest-overlap.yaml").write_text(MANIFEST + "output: ./overlap\n")
    (folder / "manifest-checked.yaml").write_text(MANIFEST + "output: ./checked\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cli = [sys.executable, "-m", "mergekit_lite"]
    cold = folder / "digests-overlap"

    def merge() -> subprocess.Popen:
        shutil.rmtree(cold, ignore_errors=True)
        command = [*cli, "merge", "--quiet", "--no-verify", str(folder / "manifest-overlap.yaml")]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, env=dict(env, MERGEKIT_LITE_CACHE=str(cold)))

    def verify() -> subprocess.Popen:
        command = [*cli, "verify", str(folder / "checked")]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def usage(proc: subprocess.Popen) -> float:
        _, status, used = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"failed: {proc.args}")
        return used.ru_utime + used.ru_stime

    def run(*starts) -> tuple[float, float]:
        began = time.perf_counter()
        procs = [start() for start in starts]
        cpu = sum(usage(p) for p in procs)
        wall = time.perf_counter() - began
        shutil.rmtree(folder / "overlap", ignore_errors=True)
        os.sync()
        time.sleep(1)
        return wall, cpu

    if not (folder / "checked").exists():  # the release that `verify` checks, made once
        subprocess.run([*cli, "merge", "--quiet", str(folder / "manifest-checked.yaml")], check=True, env=env)
    runs: dict[str, list[tuple[float, float]]] = {"merge": [], "verify": [], "both": []}
    for rep in range(args.repeat):
        runs["merge"].append(run(merge))
        runs["verify"].append(run(verify))
        runs["both"].append(run(merge, verify))
        print(f"  run {rep + 1}/{args.repeat}: " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in runs.items()))
    median = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    for name, (wall, cpu) in median.items():
        print(f"{name:7s} wall {wall:6.2f} s  CPU {cpu:6.2f} s")
    alone = median["merge"][0] + median["verify"][0]
    hidden = (alone - median["both"][0]) / median["verify"][0]
    print(
        f"side by side: {median['both'][0]:.2f} s against {alone:.2f} s one after the other: {hidden:.0%} of verify hidden"
    )


if __name__ == "__main__":
    main()
