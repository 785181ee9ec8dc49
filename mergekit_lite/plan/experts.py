"""LoRA on bare parameters (PEFT's `target_parameters`, lora.ParamWrapper) as plan ops.

PEFT wraps each targeted parameter of a module in a ParamWrapper, the first of the module's
parameters (in registration order) innermost, and saves each wrapper's factors under its place
in that nest: `<module>.lora_A.weight` is the outermost wrapper's, `<module>.base_layer.lora_A.weight`
the next one's, and so on (peft/tuners/tuners_utils.py `_inject_parameters`). Its rank and alpha
come from `rank_pattern` / `alpha_pattern` matched against `<module>.<parameter>`.

A 2-D parameter (a router's weight) takes the ordinary delta B @ A (layout linear). A 3-D one of E
experts takes, per expert e, B_e @ A_e, A_e being rows e r .. (e+1) r of A [E r, in] and B_e the
columns e, E + e, 2 E + e, ... of B [out, E r] (ParamWrapper.get_delta_weight: einsum("o r e, e r i
-> e o i", B.reshape(out, r, E), A.reshape(E, r, in)), transposed where the experts are stored
[E, in, out]). Where the checkpoint stores the fused tensor (gpt-oss, a module-name checkpoint) the
op is on it; where it stores the experts one by one, each on-disk tensor gets the op of its block
of the fused tensor, as transformers' converter builds it (sources/fused.py): stacked along the
experts (MergeModulelist(dim=0)), then concatenated (Concatenate(dim=1 or 2)).
"""

from __future__ import annotations

from typing import Any

from mergekit_lite.errors import PlanError
from mergekit_lite.plan.plan import Op
from mergekit_lite.sources.adapter import Adapter, AdapterKey
from mergekit_lite.sources.architecture import Architecture
from mergekit_lite.sources.checkpoint import Checkpoint
from mergekit_lite.sources.fused import CAT, STACK

WRAPPED = ".base_layer"


def wrapped_parameter(adapter: Adapter, module: str, arch: Architecture) -> str | None:
    """The parameter (`<module>.<name>`, a module tensor) that a ParamWrapper's factors at `module`
    adapt; None when `module` is not one of the adapter's `target_parameters` wrappers."""
    targets = adapter.config.get("target_parameters") or []
    if not targets:
        return None
    depth, inner = 0, module
    while inner.endswith(WRAPPED):
        depth, inner = depth + 1, inner[: -len(WRAPPED)]
    names = [row[0] for row in arch.parameters.get(inner, [])] or ["weight"]
    matched = [p for p in names if _targeted(f"{inner}.{p}", targets)]
    if depth < len(matched):
        return f"{inner}.{matched[::-1][depth]}"
    if depth:
        raise PlanError(
            f"{adapter.label}: `{module}` is a nest of {depth + 1} parameter wrappers, but `target_parameters` "
            f"{targets} matches {len(matched)} parameter(s) of `{inner}` in this "
            f"{arch.model_class or 'model'}; the adapter and the base do not belong together"
        )
    return None


def _targeted(key: str, targets: list[str]) -> bool:
    """PEFT's match of a parameter against `target_parameters` (its name, or a dotted suffix of it)."""
    return any(key == t or key.endswith(f".{t}") for t in targets)


def stacked_shape(tensor: str, arch: Architecture) -> tuple[tuple[int, ...], bool] | None:
    """The module shape [E, ., .] of a 3-D expert parameter and whether it is stored [E, in, out]; None for others."""
    module, _, name = tensor.rpartition(".")
    for param, shape, transposed in arch.parameters.get(module, []):
        if param == name and len(shape) == 3:
            return tuple(shape), transposed
    return None


def expert_ops(
    adapter: Adapter,
    tensor: str,
    a: AdapterKey,
    b: AdapterKey,
    scale: float,
    ckpt: Checkpoint,
    to_disk: dict[str, str],
) -> list[tuple[str, Op]]:
    """The (on-disk tensor, op) pairs of a ParamWrapper's delta on the 3-D expert parameter `tensor`."""
    arch = ckpt.architecture
    found = stacked_shape(tensor, arch)
    assert found is not None
    shape, transposed = found
    experts = shape[0]
    out_f, in_f = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
    rank, _ = adapter.rank_alpha(tensor)
    if a.entry.shape != (experts * rank, in_f) or b.entry.shape != (out_f, experts * rank):
        raise PlanError(
            f"{adapter.label}: `{a.key}` {list(a.entry.shape)} and `{b.key}` {list(b.entry.shape)} do not fit "
            f"`{tensor}` {list(shape)}: a ParamWrapper of rank {rank} on {experts} experts needs "
            f"[{experts * rank}, {in_f}] and [{out_f}, {experts * rank}]"
        )
    layout = "experts_t" if transposed else "experts"
    op = Op("delta", adapter.index, (a.key, b.key), scale, layout, experts=experts)
    disk = to_disk.get(tensor, tensor)
    if disk in ckpt.tensors:  # stored fused: the op on the whole, expert by expert
        if ckpt.tensors[disk].shape != shape:
            raise PlanError(f"`{disk}` is {list(ckpt.tensors[disk].shape)} in the checkpoint, not {list(shape)}")
        return [(disk, op)]
    fusion = arch.fusion.get(tensor)
    if fusion is None:
        raise PlanError(
            f"{adapter.label}: `{a.key}` changes `{tensor}`, which this {arch.model_class or 'model'} has but "
            "the checkpoint neither stores nor builds from its tensors"
        )
    return [
        (key, Op("delta", adapter.index, (a.key, b.key), scale, layout, experts=experts, expert=e, block=block))
        for key, e, block in _blocks(tensor, shape, fusion, ckpt, arch)
    ]


def _blocks(
    tensor: str, shape: tuple[int, ...], fusion: dict[str, Any], ckpt: Checkpoint, arch: Architecture
) -> list[tuple[str, int, tuple[int, int, int, int]]]:
    """Each on-disk source of a fused expert tensor: (key, expert, its block of that expert's 2-D slice)."""
    ops = fusion["ops"]
    experts, rows, cols = shape
    cat = None
    if ops[:1] != [f"{STACK}:0"] or len(ops) > 2 or (len(ops) == 2 and ops[1] not in (f"{CAT}:1", f"{CAT}:2")):
        raise PlanError(
            f"`{tensor}` of this {arch.model_class}: transformers builds it from the checkpoint's tensors with "
            f"{ops}, which the merge cannot split back (it splits stacked experts, concatenated along a matrix axis)"
        )
    if len(ops) == 2:
        cat = int(ops[1].split(":")[1]) - 1  # the axis of one expert's matrix the patterns are concatenated along
    by_expert: dict[int, list[tuple[int, str]]] = {}
    for key, pattern, expert in fusion["sources"]:
        if not 0 <= expert < experts:
            raise PlanError(f"`{key}` is not one of the {experts} experts of `{tensor}` (expert number {expert})")
        by_expert.setdefault(expert, []).append((pattern, key))
    if sorted(by_expert) != list(range(experts)):
        missing = sorted(set(range(experts)) - set(by_expert))
        raise PlanError(f"the checkpoint stores no tensors of experts {missing} of `{tensor}`")
    found = []
    for expert, sources in sorted(by_expert.items()):
        offset = 0
        for _, key in sorted(sources):
            part = ckpt.tensors[key].shape
            size = part[cat] if cat is not None and len(part) == 2 else None
            if cat is None:
                block = (0, rows, 0, cols)
            elif size is None:
                block = (0, 0, 0, 0)
            else:
                block = (offset, offset + size, 0, cols) if cat == 0 else (0, rows, offset, offset + size)
                offset += size
            if part != (block[1] - block[0], block[3] - block[2]):
                raise PlanError(
                    f"`{key}` {list(part)} is not a block of expert {expert} of `{tensor}` {list(shape)} as "
                    f"transformers builds it ({ops})"
                )
            found.append((key, expert, block))
        if cat is not None and offset != (rows, cols)[cat]:
            raise PlanError(f"the tensors of expert {expert} do not make up its part of `{tensor}` {list(shape)}")
    return found
