"""A/B timing of `mergekit-lite merge` from two source trees, alternating, on a synthetic checkpoint.

For a change to the merge's hot path: each run is a fresh process started in one tree (so that
`python -m mergekit_lite` imports that tree's code), A and B alternate so that drifts in the
machine's state hit both, and the base is read before each run (warm page cache). The inputs'
digests are cached by an untimed first run (a rerun's case), so the figures are the merge itself.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python benchmarks/ab.py /tmp/before . --size 6 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, type=Path, help="the two source trees, A then B")
    parser.add_argument("--size", type=float, default=6.0, help="checkpoint size in GB")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tree (median reported)")
    parser.add_argument("--gate", action="store_true", help="with the streamed gate (verify.logits: false)")
    args = parser.parse_args()
    folder = speed.build(args.size)
    cmds = speed.commands(folder)
    command = cmds["mk+gate" if args.gate else "mk-cached"]
    output, cache = folder / "merged", speed.digest_cache("mk-cached", folder)
    speed.warm(folder)
    speed.measure(command, output, cache)  # fills the digest cache; not timed
    speed.clean(output)
    walls: dict[Path, list[float]] = {t: [] for t in args.trees}
    rss: dict[Path, list[float]] = {t: [] for t in args.trees}
    cpu: dict[Path, list[float]] = {t: [] for t in args.trees}
    for i in range(args.repeat):
        for tree in args.trees:
            speed.warm(folder)
            wall, peak, used = speed.measure_usage(command, output, cache, cwd=tree.resolve())
            speed.clean(output)
            walls[tree].append(wall)
            rss[tree].append(peak)
            cpu[tree].append(used)
            print(f"run {i + 1} {tree}: {wall:.2f} s, CPU {used:.2f} s, {peak:.2f} GiB", flush=True)
    for tree in args.trees:
        print(f"{tree}: median {statistics.median(walls[tree]):.2f} s (range {min(walls[tree]):.2f}-"
              f"{max(walls[tree]):.2f}), CPU median {statistics.median(cpu[tree]):.2f} s, "
              f"peak RSS {max(rss[tree]):.2f} GiB")
    a, b = (statistics.median(walls[t]) for t in args.trees)
    ca, cb = (statistics.median(cpu[t]) for t in args.trees)
    print(f"B / A = {b / a:.3f} (wall), {cb / ca:.3f} (CPU)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
