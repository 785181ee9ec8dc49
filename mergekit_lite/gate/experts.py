"""The gate's own reading of an expert delta (PEFT's ParamWrapper on stacked experts, layouts
`experts` / `experts_t` of vocabulary.py): expert e's factors taken by PEFT's reshapes
(ParamWrapper.get_delta_weight), not by the merge's slicing (merge/mathops.expert_factors), and a
fused expert tensor [E, ., .] seen as E matrices, each checked on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace

import torch

from mergekit_lite.io.reader import TensorReader
from mergekit_lite.plan.plan import Op, PlannedTensor
from mergekit_lite.vocabulary import EXPERT_LAYOUTS


def canonical_factors(op: Op, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_e, A_e): op's expert's factors in the [out, in] frame, cut to the part of its matrix the
    tensor holds (op.block is in the stored frame: [in, out] for `experts_t`)."""
    n = op.experts
    a_e = a.reshape(n, -1, a.shape[-1])[op.expert]  # A.reshape(E, r, in)[e]: [r, in]
    b_e = b.reshape(b.shape[0], -1, n)[:, :, op.expert]  # B.reshape(out, r, E)[..., e]: [out, r]
    if op.block:
        r0, r1, c0, c1 = op.block
        if op.layout == "experts_t":  # stored rows are the inputs, columns the outputs
            a_e, b_e = a_e[:, r0:r1], b_e[c0:c1]
        else:
            b_e, a_e = b_e[r0:r1], a_e[:, c0:c1]
    return b_e, a_e


def matrices(
    t: PlannedTensor, merged: torch.Tensor, w0: torch.Tensor
) -> Iterator[tuple[PlannedTensor, torch.Tensor, torch.Tensor]]:
    """The tensor as the checks take it: itself, or for fused experts each expert's matrix, named
    `<tensor>[e]`, with its ops narrowed to that expert."""
    if merged.dim() != 3 or not t.ops or not all(op.layout in EXPERT_LAYOUTS for op in t.ops):
        yield t, merged, w0
        return
    for e in range(merged.shape[0]):
        ops = [replace(op, expert=e) for op in t.ops]
        yield replace(t, name=f"{t.name}[{e}]", shape=tuple(merged.shape[1:]), ops=ops), merged[e], w0[e]


class KeptReader:
    """An adapter's reader that keeps the last few tensors of `shared` (the factors of experts stored
    one by one, which each expert's tensors read again), so that they are read once, not per expert."""

    KEPT = 4

    def __init__(self, reader: TensorReader, shared: set[str]) -> None:
        self.reader, self.shared = reader, shared
        self.kept: OrderedDict[str, torch.Tensor] = OrderedDict()

    def load(self, key: str) -> torch.Tensor:
        if key not in self.shared:
            return self.reader.load(key)
        if key in self.kept:
            self.kept.move_to_end(key)
            return self.kept[key]
        tensor = self.kept[key] = self.reader.load(key)
        while len(self.kept) > self.KEPT:
            self.kept.popitem(last=False)
        return tensor
