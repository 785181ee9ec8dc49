"""The gate's per-tensor checks in flight: run while the merge writes, on the bytes as written.

A merge whose shards go to a slow disk leaves a core idle while it waits for its writes (6 GB at
0.6-0.8 GB/s here: the merge runs at about one core of two), and a gate that starts only once the
merge is done then reads every shard back and checks it. In flight, the algebra (check_algebra:
finiteness, unchanged tensors equal the base, probes, every element) runs on a thread of its own
from the moment the merge starts: each tensor is read back from its shard file as soon as the writer
has written its bytes (io/writer.Written; the read is of the file, not of the merge's memory), and the
digests of SHA256SUMS come from that same read (io/readback.py). The checks run at a lower priority
(nice 10), so that they take the time the merge leaves and the merge's own threads go first.

The table of the shards is predicted from the plan (io/format.layout, the header the writer writes).
When the merge is done, the gate's structure checks parse the real headers: only if they equal the
prediction, and the checks ran to their end, are these rows taken; otherwise the gate runs the
algebra again on the finished shards, as without flight. Where the plan's shards are not written by
this process (the processes and Ray executors) or hold FP8 weights (whose scales are read apart),
there is no flight.

What it reads is what was on disk when each tensor had just been written; `verify.in_flight: false`
reads the finished, fsync'd shards instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_lite.gate.algebra import check_algebra
from mergekit_lite.gate.report import GateReport
from mergekit_lite.io.format import TensorEntry, layout
from mergekit_lite.io.reader import TensorReader
from mergekit_lite.io.writer import Abandoned, Written
from mergekit_lite.plan.plan import SHARD_METADATA, Plan
from mergekit_lite.sources.adapter import Adapter
from mergekit_lite.sources.checkpoint import Checkpoint

_stages = logging.getLogger("mergekit_lite.stages")

NICE = 10  # the checks' thread priority in flight: below the merge's


def can_fly(plan: Plan, executor: str) -> bool:
    """Whether the checks can run in flight: the shards written by this process, no FP8 weights."""
    return executor == "local" and not any(t.fp8_block or t.scale_of for t in plan.tensors)


def predicted(plan: Plan, folder: Path) -> dict[str, TensorEntry]:
    """The release's tensor table as the structure checks will read it, from the plan."""
    table: dict[str, TensorEntry] = {}
    for index, name in enumerate(plan.shard_names):
        table.update(layout(folder / name, plan.shard_entries(index), SHARD_METADATA))
    return table


@dataclass
class Outcome:
    """What the checks in flight found: their rows and the shards' digests, or why they have none."""

    report: GateReport
    limits: dict[str, float]  # the thresholds the checks ran with
    read_back: dict[Path, str] = field(default_factory=dict)
    error: BaseException | None = None
    seconds: float = 0.0


class InFlight:
    """The algebra checks of a gated merge, on a thread that follows the merge's writes."""

    def __init__(
        self,
        plan: Plan,
        checkpoint: Checkpoint,
        adapters: list[Adapter],
        folder: Path,
        dtype: str,
        limits: dict[str, float],
    ) -> None:
        """`dtype` and `limits`: the release's dtype and the thresholds for it, as the gate has them."""
        self.plan, self.checkpoint, self.adapters = plan, checkpoint, adapters
        self.table = predicted(plan, folder)
        self.written = Written()
        self.threads = torch.get_num_threads()  # the caller's: torch's default may change while the merge runs
        self.outcome = Outcome(GateReport(dtype=dtype), limits)
        self.thread = threading.Thread(target=self._run, name="mergekit-gate-in-flight", daemon=True)
        # set when the checks have ended: an Event can be waited on again after a signal cut the wait
        # short, a Thread.join (Python 3.11) may then report a thread done that still runs
        self.done = threading.Event()

    def start(self) -> InFlight:
        self.thread.start()
        return self

    def _run(self) -> None:
        began = time.monotonic()
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)  # Linux: this thread and those it starts
        except (OSError, AttributeError):
            pass
        try:
            check_algebra(
                self.outcome.report,
                self.plan,
                self.adapters,
                base=TensorReader(self.checkpoint.tensors),
                candidate=self.table,
                limits=self.outcome.limits,
                digests=self.outcome.read_back,
                ready=self.written.wait,
                threads=self.threads,
            )
        except BaseException as exc:  # noqa: BLE001  reported to the gate, which runs the checks again
            self.outcome.error = exc
        finally:
            self.outcome.seconds = time.monotonic() - began
            self.done.set()

    def stop(self) -> None:
        """The merge is over: wait for the checks to end (a read of bytes never written gives up)."""
        self.written.stop()
        self._wait()

    def cancel(self) -> None:
        """The run is over, by an error or a signal: the checks give up at their next read, and are
        waited for, so that nothing reads the staging folder once it goes. Safe to call more than once."""
        self.written.cancel()
        self._wait()

    def _wait(self) -> None:
        if self.thread.ident is not None:  # started
            while not self.done.wait(0.1):
                pass
        torch.set_num_threads(self.threads)

    def result(self, tensors: dict[str, TensorEntry] | None) -> Outcome | None:
        """The outcome, once the merge is done and `tensors` is the table the structure checks read;
        None when it cannot stand for the checks on the finished shards (the gate runs them again)."""
        self.stop()
        outcome = self.outcome
        if outcome.error is not None:
            reason = "the merge stopped" if isinstance(outcome.error, Abandoned) else type(outcome.error).__name__
            _stages.info("gate: the checks in flight did not finish (%s): run again on the shards", reason)
            return None
        if tensors != self.table:
            _stages.info("gate: the shards' headers are not the planned ones: the algebra runs again")
            return None
        return outcome
