"""Where the gate's CPU goes: its streamed checks (structure, algebra with every element, packaging; no
logits) on a synthetic release, in this process, with each stage's functions timed in thread CPU
seconds on whichever thread runs them (the checks' blocks run on worker threads, which cProfile does
not see). Builds (once) the synthetic bf16 checkpoint of benchmarks/synthetic.py and merges it once
with --no-verify.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gate_profile.py --size 1 --repeat 2

Nested rows overlap: `_check_blocks` (the elementwise check, every element) includes
`Expectation.rows` (W + delta in float64), `_differing` and `_measure`; `_row_pass` is the probes'
passes over W' and W; `HashedReads._hash` the SHA-256 of the read-back; `load_into` the reads.
"""

from __future__ import annotations

import argparse
import collections
import functools
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMED = {
    "mergekit_lite.gate.elementwise": [
        "_check_blocks",
        "_measure",
        "_differing",
        "Expectation.rows",
        "Expectation.rows32",
        "Expectation.at",
    ],
    "mergekit_lite.gate.rows": ["_row_pass"],
    "mergekit_lite.gate.algebra": ["_equals_base", "_probe"],
    "mergekit_lite.io.readback": ["HashedReads._hash"],
    "mergekit_lite.io.reader": ["TensorReader.load_into"],
}


def instrument(totals: dict[str, list[float]]) -> None:
    """Wrap each function of TIMED to add its wall and thread CPU seconds and calls to `totals`."""
    import importlib

    lock = threading.Lock()
    for module_name, names in TIMED.items():
        module = importlib.import_module(module_name)
        for name in names:
            owner, attr = (
                (module, name) if "." not in name else (getattr(module, name.split(".")[0]), name.split(".")[1])
            )
            fn = getattr(owner, attr, None)
            if fn is None:  # an older tree (benchmarks/ab.py-style comparisons): not timed there
                continue

            def timed(*args, __fn=fn, __label=name, **kwargs):
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    return __fn(*args, **kwargs)
                finally:
                    with lock:
                        row = totals[__label]
                        row[0] += time.perf_counter() - wall
                        row[1] += time.thread_time() - cpu
                        row[2] += 1

            setattr(owner, attr, functools.wraps(fn)(timed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=1.0, help="checkpoint size in GB")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    folder = HERE / "work" / f"llama-{args.size:g}GB"
    subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(folder), str(args.size)], check=True)
    manifest = folder / "manifest-profile.yaml"
    manifest.write_text(
        "base: ./base\nadapters: [./adapter]\ndtype: bfloat16\ntokenizer: none\noutput: ./profiled\n"
        "verify: {logits: false}\n"
    )
    out = folder / "profiled"
    if not out.exists():
        subprocess.run(
            [sys.executable, "-m", "mergekit_lite", "merge", "--quiet", "--no-verify", str(manifest)],
            check=True,
            cwd=HERE.parent,
        )

    from mergekit_lite.gate import run_gate
    from mergekit_lite.pipeline import prepare

    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    instrument(totals)
    job = prepare(manifest, for_output=False)

    def gate() -> None:
        report = run_gate(
            job.plan,
            job.checkpoint,
            job.adapters,
            out,
            settings=job.manifest.manifest.verify,
            device_map="cpu",
            tokenizer_source=None,
        )
        assert report.passed, [(c.name, c.detail) for c in report.failures]

    gate()  # warm-up: imports, page cache
    totals.clear()
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.repeat):
        gate()
    after, n = resource.getrusage(resource.RUSAGE_SELF), args.repeat
    used = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n
    print(f"gate, mean of {n}: wall {(time.perf_counter() - wall) / n:.2f} s, process CPU {used:.2f} s")
    for label, (w, c, calls) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"  {label:26s} calls {calls // n:6d}  wall {w / n:6.2f} s  thread CPU {c / n:6.2f} s")


if __name__ == "__main__":
    main()
