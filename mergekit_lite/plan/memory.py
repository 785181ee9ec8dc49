"""The merge's memory model: its tuning constants and the peak memory the plan predicts from them.

The merge (merge/merge.py) reads these constants from here, so that the prediction and the merge
cannot drift apart; the plan computes `peak_bytes` with them before anything is read.
"""

from __future__ import annotations

import math

from mergekit_lite.io.dequant import CHUNK as DEQUANT_CHUNK
from mergekit_lite.io.format import ITEMSIZE
from mergekit_lite.io.writer import STAGING
from mergekit_lite.plan.plan import CombinePlan, Op, PlannedTensor
from mergekit_lite.sources.adapter import Adapter
from mergekit_lite.vocabulary import EXPERT_LAYOUTS

ROW_BLOCK = 2**18  # elements of a weight merged at a time by one thread (a float64 block of 2 MiB)
SCRATCH_BYTES = 24  # per element of a block: exact.Scratch's float64, float32 and integer buffers
ROW_THREADS = 8  # at most this many threads merge the blocks of one tensor
WRITE_BEHIND = 2  # the writer thread may be this many tensors behind the math
# expert factors kept between tensors: the experts of a module stored one by one (interleaved with
# another module's, gate/up and down) all read the same A and B, which are read once each
EXPERT_FACTORS_KEPT = 4


def merges_by_rows(t: PlannedTensor) -> bool:
    """Whether the merge can take `t` one block of rows at a time on its threads: only linear LoRA
    deltas on a matrix (an expert's matrix stored on its own included)."""
    return len(t.shape) == 2 and bool(t.ops) and all(op.kind == "delta" and _by_rows(op) for op in t.ops)


def _by_rows(op: Op) -> bool:
    return op.layout == "linear" or (op.layout in EXPERT_LAYOUTS and op.expert >= 0)


def peak_bytes(tensors: list[PlannedTensor], adapters: list[Adapter], combined: CombinePlan | None = None) -> int:
    """Predicted peak bytes of the merge: the largest working set of one tensor, the reused buffers,
    and the outputs of the tensors before it, which the writer thread may still be writing.
    A combined adapter adds the work of combining one module, and for dare the factors it holds."""
    factor_bytes = {(a.index, k.key): 4 * k.entry.numel for a in adapters for k in a.keys}
    held = 0
    if combined is not None:
        for m in combined.modules:
            work = m.work_bytes(combined.effective, combined.svd_full_matrices)
            factor_bytes.update({(combined.index, m.keys[0]): work, (combined.index, m.keys[1]): 0})
        held = combined.held_bytes()
    worst = by_rows_out = by_rows_width = whole_out = 0
    for t in tensors:
        if t.copied:
            continue  # copied file to file
        if t.scale_of:
            continue  # computed with its FP8 weight, counted there
        numel = math.prod(t.shape)
        need = numel * ITEMSIZE[t.src_dtype]  # the source, as far as it is read (dequantized: its values)
        out_bytes = t.nbytes
        if t.fp8_block:  # merged in float32, then quantized one row of blocks at a time (merge/fp8.py):
            out_bytes = numel * 4  # the float32 merge is the output buffer, the codes and scales come beside it
            need += numel + 4 * math.prod(t.fp8_block) * 3 * -(-t.shape[1] // t.fp8_block[1])
        if t.quantized:  # and its stored parts (at most a byte a value), and one chunk's codes and products
            need += numel + DEQUANT_CHUNK * 12
        need += sum(factor_bytes[op.adapter, k] for op in t.ops for k in op.keys)
        if merges_by_rows(t):
            by_rows_out, by_rows_width = max(by_rows_out, out_bytes), max(by_rows_width, t.shape[1])
        elif len(t.shape) == 3 and all(op.layout in EXPERT_LAYOUTS for op in t.ops):
            # fused experts, one expert's matrix at a time: the scratch block and the output
            need += SCRATCH_BYTES * (ROW_BLOCK + 3 * t.shape[-1]) + out_bytes
            whole_out = max(whole_out, out_bytes)
        elif any(op.kind == "dora" for op in t.ops):
            # float64 as a whole: accumulator, unmerged copy, delta, and the temporaries of the rescale
            need += numel * 8 * 7 + out_bytes
            whole_out = max(whole_out, out_bytes)
        else:
            # by blocks of rows: a float32 starting copy (replaced tensors), the scratch block, the output
            need += numel * 4 + SCRATCH_BYTES * (ROW_BLOCK + 3 * t.shape[-1]) + out_bytes
            whole_out = max(whole_out, out_bytes)
        worst = max(worst, need)
    # output buffers taken in turn, and per thread a scratch block of ROW_BLOCK elements (plus up to three rows)
    scratch = ROW_THREADS * SCRATCH_BYTES * (ROW_BLOCK + 3 * by_rows_width) if by_rows_out else 0
    reused = (WRITE_BEHIND + 1) * by_rows_out + scratch
    # and the staging buffers of the shard being written and of the one before it, while it closes
    experts = {(op.adapter, k) for t in tensors if not t.copied for op in t.ops if op.experts for k in op.keys}
    held += sum(sorted((factor_bytes[key] for key in experts), reverse=True)[:EXPERT_FACTORS_KEPT])
    return worst + reused + WRITE_BEHIND * whole_out + 2 * STAGING + held
