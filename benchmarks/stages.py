"""Where the time of one `mergekit-lite merge --no-verify` goes, stage by stage (for benchmarks/speed.py).

Runs the CLI in this process with the pipeline's stage functions wrapped in timers, and prints
one JSON object of seconds per stage on stdout.

    .venv/bin/python benchmarks/stages.py MANIFEST
    .venv/bin/python benchmarks/stages.py MANIFEST --no-shard-hashing   # what hashing the shards costs
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

START = time.perf_counter()

import mergekit_lite.pipeline as pipeline  # noqa: E402  (timed: the imports are a stage)
import mergekit_lite.release.receipt  # noqa: E402, F401  (its import time counts too)
from mergekit_lite.cli import main  # noqa: E402

STAGES = {
    pipeline: (
        "read_checkpoint",
        "check_adapter_values",
        "build_plan",
        "write_shards",
        "run_shards",
        "write_index",
        "write_configs",
        "write_receipt",
        "write_checksums",
        "publish",
    ),
}


def _timed(seconds: Counter[str], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start

    return wrapper


def run(manifest: str) -> dict[str, float]:
    seconds: Counter[str] = Counter({"imports": time.perf_counter() - START})
    for module, names in STAGES.items():
        for name in names:
            if hasattr(module, name):  # the pipeline changes; time what it has
                setattr(module, name, _timed(seconds, name, getattr(module, name)))
    sys.argv = ["mergekit-lite", "merge", "--quiet", "--no-verify", manifest]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main()
    seconds["total"] = time.perf_counter() - START
    seconds["other"] = seconds["total"] - sum(v for k, v in seconds.items() if k != "total")
    return {k: round(v, 2) for k, v in seconds.items()}


def without_shard_hashing() -> None:
    """For measuring what hashing costs: the shard writers keep no digest (the receipt then hashes
    the shards afterwards, by reading them back: its time moves to `write_receipt`)."""
    import mergekit_lite.io.writer as writer

    init = writer.ShardWriter.__init__

    def no_digest(self, path, entries, metadata, digest=False):  # noqa: ANN001
        init(self, path, entries, metadata, digest=False)

    writer.ShardWriter.__init__ = no_digest


if __name__ == "__main__":
    if "--no-shard-hashing" in sys.argv:
        sys.argv.remove("--no-shard-hashing")
        without_shard_hashing()
    print(json.dumps(run(sys.argv[1])))
