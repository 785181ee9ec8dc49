"""Peak RSS (with wall and CPU seconds) of mergekit-lite in each mode on synthetic bf16 checkpoints of
two sizes: `merge` (--no-verify), `gated` (the merge with the gate's streamed checks: structure,
per-tensor algebra and elementwise, packaging; `verify.logits: false`) and `verify` (the gate on the
published release: integrity, then the same checks). The end-to-end check loads the model with
transformers, so it is measured apart.

The figure must not grow with the model: every mode holds about one tensor at a time.

    .venv/bin/python benchmarks/memory.py                       # about 1 GB and 4 GB, every mode
    .venv/bin/python benchmarks/memory.py --sizes 1 2 --modes gated verify
    .venv/bin/python benchmarks/memory.py --sizes 0.5 1.5 --modes merge gated --dtype float8_e4m3fn
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from speed import measure_usage

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
MODES = ("merge", "gated", "verify")
MANIFEST = "base: ./base\nadapters: [./adapter]\ndtype: {dtype}\ntokenizer: none\noutput: ./merged\n"


def build(folder: Path, size: float, dtype: str = "bfloat16") -> tuple[Path, Path]:
    """Build the checkpoint in a child process, so this process stays small: a forked child's
    peak RSS includes the parent's pages until it execs, which would inflate the measurement."""
    subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(folder), str(size)], check=True)
    manifest = MANIFEST.format(dtype=dtype)
    (folder / "manifest.yaml").write_text(manifest)
    (folder / "manifest-gate.yaml").write_text(manifest + "verify: {logits: false}\n")
    return folder / "base", folder / "adapter"


def command(mode: str, folder: Path) -> list[str]:
    cli = [sys.executable, "-m", "mergekit_lite"]
    if mode == "merge":
        return [*cli, "merge", "--quiet", "--no-verify", str(folder / "manifest.yaml")]
    if mode == "gated":
        return [*cli, "merge", "--quiet", str(folder / "manifest-gate.yaml")]
    return [*cli, "verify", str(folder / "merged")]  # the gated release's own manifest: logits off


def run_size(size: float, modes: list[str], dtype: str = "bfloat16") -> list[tuple[str, float, float, float]]:
    """(mode, wall s, peak RSS GiB, CPU s) of each mode, one fresh process each."""
    folder = WORK / f"llama-{size:g}GB"
    build(folder, size, dtype)
    out = folder / "merged"
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for mode in modes:
        if mode == "verify" and not out.exists():  # verify needs a gated release to check
            measure_usage(command("gated", folder), out)
        wall, rss, cpu = measure_usage(command(mode, folder), out)
        rows.append((mode, wall, rss, cpu))
        print(f"  {size:g} GB {mode:>6}: {wall:6.1f} s, CPU {cpu:6.1f} s, {rss:5.2f} GiB", file=sys.stderr)
        if mode != "gated" or "verify" not in modes:
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 4.0], help="checkpoint sizes in GB")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which modes to run")
    parser.add_argument("--dtype", default="bfloat16", help="the manifest's dtype (float8_e4m3fn: an FP8 release)")
    args = parser.parse_args()
    modes = [m for m in MODES if m in args.modes]
    results = {}
    for size in args.sizes:
        folder = WORK / f"llama-{size:g}GB"
        results[size] = run_size(size, modes, args.dtype)
        results[size] = (sum(p.stat().st_size for p in (folder / "base").glob("*.safetensors")) / 1e9, results[size])
    print(
        f"{'target':>7} {'model GB':>9} {'mode':>7} {'wall s':>7} {'CPU s':>7} {'peak RSS GiB':>13} {'RSS / model':>12}"
    )
    for size, (gb, rows) in results.items():
        for mode, wall, rss, cpu in rows:
            print(
                f"{size:>6g}G {gb:>9.2f} {mode:>7} {wall:>7.1f} {cpu:>7.1f} {rss:>13.2f} {rss * 2**30 / (gb * 1e9):>12.2f}"
            )
    if len(results) > 1:
        (small_gb, small), (large_gb, large) = results[args.sizes[0]], results[args.sizes[-1]]
        for (mode, _, rss_small, _), (_, _, rss_large, _) in zip(small, large, strict=True):
            print(
                f"{mode}: peak RSS largest/smallest {rss_large / rss_small:.2f} (model ratio {large_gb / small_gb:.2f})"
            )


if __name__ == "__main__":
    main()
