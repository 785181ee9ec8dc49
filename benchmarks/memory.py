"""Peak RSS of `mergekit-lite merge --no-verify` on synthetic bf16 checkpoints of two sizes (the gate's
end-to-end check loads the model with transformers, so it is measured apart).

The figure must not grow with the model: the merge holds one tensor at a time.

    .venv/bin/python benchmarks/memory.py              # about 1 GB and 4 GB
    .venv/bin/python benchmarks/memory.py --sizes 0.5 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"


def build(folder: Path, size: float) -> tuple[Path, Path]:
    """Build the checkpoint in a child process, so this process stays small: a forked child's
    peak RSS includes the parent's pages until it execs, which would inflate the measurement."""
    subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(folder), str(size)], check=True)
    return folder / "base", folder / "adapter"


def measure(manifest: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one `mergekit-lite merge` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergekit_lite", "merge", "--quiet", "--no-verify", str(manifest)],
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"merge failed for {manifest}")
    return wall, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 4.0], help="checkpoint sizes in GB")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        folder = WORK / f"llama-{size:g}GB"
        base, adapter = build(folder, size)
        out = folder / "merged"
        shutil.rmtree(out, ignore_errors=True)
        manifest = folder / "manifest.yaml"
        manifest.write_text("base: ./base\nadapters: [./adapter]\ndtype: bfloat16\ntokenizer: none\noutput: ./merged\n")
        model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        wall, rss = measure(manifest)
        rows.append((size, model_bytes / 1e9, wall, rss))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(f"{'target':>7} {'model GB':>9} {'wall s':>7} {'peak RSS GiB':>13} {'RSS / model':>12}")
    for size, gb, wall, rss in rows:
        print(f"{size:>6g}G {gb:>9.2f} {wall:>7.1f} {rss:>13.2f} {rss * 2**30 / (gb * 1e9):>12.2f}")
    if len(rows) > 1:
        growth = rows[-1][3] / rows[0][3]
        print(f"peak RSS ratio largest/smallest: {growth:.2f} (model ratio {rows[-1][1] / rows[0][1]:.2f})")


if __name__ == "__main__":
    main()
