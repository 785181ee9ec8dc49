"""What `verify`'s integrity check and the gate's elementwise check cost, on a synthetic checkpoint.

Builds (once) the synthetic bf16 checkpoint of benchmarks/synthetic.py, merges it once with
--no-verify, then runs the gate's streamed checks (structure, algebra, packaging; no logits) on
the release in this process, alternating with and without the elementwise check (its per-tensor
work replaced by nothing), and times the integrity check (every file hashed) alone. Wall and CPU
seconds, medians of `--repeat` runs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gate_elements.py --size 1 --repeat 3
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> tuple[float, float]:
    wall, used = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - wall, cpu() - used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=1.0, help="checkpoint size in GB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = HERE / "work" / f"llama-{args.size:g}GB"
    subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(folder), str(args.size)], check=True)
    manifest = folder / "manifest-elements.yaml"
    manifest.write_text(
        "base: ./base\nadapters: [./adapter]\ndtype: bfloat16\ntokenizer: none\noutput: ./released\nverify: {logits: false}\n"
    )
    out = folder / "released"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "mergekit_lite", "merge", "--quiet", "--no-verify", str(manifest)],
        check=True,
        cwd=HERE.parent,
    )

    from mergekit_lite.gate import elementwise, run_gate
    from mergekit_lite.gate.integrity import check_integrity
    from mergekit_lite.gate.report import GateReport
    from mergekit_lite.pipeline import prepare

    job = prepare(manifest, for_output=False)
    m = job.manifest.manifest
    real = elementwise.ElementCheck.check

    def gate(with_elements: bool) -> None:
        elementwise.ElementCheck.check = real if with_elements else lambda *a, **k: None
        report = run_gate(
            job.plan, job.checkpoint, job.adapters, out, settings=m.verify, device_map="cpu", tokenizer_source=None
        )
        assert report.passed, [(c.name, c.detail) for c in report.failures]

    runs: dict[str, list[tuple[float, float]]] = {
        "gate without elements": [],
        "gate with elements": [],
        "integrity": [],
    }
    gate(True)  # warm-up: page cache, imports
    for _ in range(args.repeat):
        runs["gate without elements"].append(timed(lambda: gate(False)))
        runs["gate with elements"].append(timed(lambda: gate(True)))
        runs["integrity"].append(timed(lambda: check_integrity(GateReport("BF16"), out)))
    elementwise.ElementCheck.check = real
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"release {size / 1e9:.2f} GB, {sum(1 for t in job.plan.tensors if t.ops)} changed tensors")
    for name, values in runs.items():
        walls, cpus = [w for w, _ in values], [c for _, c in values]
        print(
            f"{name:24s} wall {statistics.median(walls):6.2f} s ({min(walls):.2f}-{max(walls):.2f})"
            f"  cpu {statistics.median(cpus):6.2f} s"
        )


if __name__ == "__main__":
    main()
