"""Wall time and peak RSS of one `mergekit-lite merge` with the whole gate, logits included, on a
synthetic bf16 checkpoint (benchmarks/synthetic.py: Llama-style, rank-16 LoRA on every linear layer).

The end-to-end check chooses its runner as in any merge: on a model whose two float32 copies would
not fit in half the free memory it runs both models layer by layer from the files (gate/streamed.py).
Prints the process's wall time and peak RSS, the runner the gate chose, its end-to-end rows and its
seconds per group of checks.

    .venv/bin/python benchmarks/full_gate.py --size 6                      # README's Measured row
    .venv/bin/python benchmarks/full_gate.py --size 6 --inputs benchmarks/work/llama-6GB   # reuse a built one
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from speed import measure_usage

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=6.0, help="checkpoint size in GB")
    parser.add_argument("--inputs", type=Path, help="a folder holding base/ and adapter/ already built for this size")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt (the default's 16)")
    args = parser.parse_args()
    folder = WORK / f"gate-{args.size:g}GB"
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("base", "adapter"):
        link = folder / part
        if args.inputs is not None and not link.exists():
            link.symlink_to((args.inputs / part).resolve())
    # built in a child process, so that this one (and the measured one) stays small
    subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(folder), str(args.size)], check=True)
    manifest = folder / "manifest.yaml"
    manifest.write_text(
        "base: ./base\nadapters: [./adapter]\ndtype: bfloat16\ntokenizer: none\noutput: ./merged\n"
        f"verify: {{max_new_tokens: {args.new_tokens}}}\n"
    )
    out = folder / "merged"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "mergekit_lite", "merge", "--quiet", str(manifest)]
    wall, rss, cpu = measure_usage(command, out, cwd=HERE.parent)
    report = json.loads((out / "verification.json").read_text())
    gigabytes = sum(p.stat().st_size for p in (folder / "base").glob("*.safetensors")) / 1e9
    print(
        f"model {gigabytes:.2f} GB bf16; merge + whole gate: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss:.2f} GiB"
    )
    context = report.get("context", {})
    print(f"end-to-end runner: {context.get('runner')}")
    for check in report.get("checks", []):
        if check.get("group") == "end_to_end":
            print(
                f"  {check.get('name')}: {check.get('figure')} (threshold {check.get('threshold')}) {check.get('passed')}"
            )
    print("gate seconds per group:", {k: round(v, 1) for k, v in report.get("timings", {}).items()})
    print(f"published: {report.get('passed')}; peak RSS <= 6 GiB: {'yes' if rss <= 6 else 'NO'}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
