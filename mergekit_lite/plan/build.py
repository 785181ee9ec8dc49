"""Building the merge plan (plan.py's data) from headers and configs, before any tensor data is read.

Every adapter tensor is claimed by exactly one operation on one output tensor, every shape and
rank is checked, and the output's tensors, dtypes and shards are fixed here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

from mergekit_lite.errors import PlanError
from mergekit_lite.io.format import FLOAT_DTYPES, TensorEntry
from mergekit_lite.manifest.sections import CombineSpec, Fp8Spec
from mergekit_lite.plan import experts
from mergekit_lite.plan.combine import plan_combine
from mergekit_lite.plan.fp8 import DENSE_DTYPE, FP8_DTYPE, plan_fp8
from mergekit_lite.plan.memory import peak_bytes
from mergekit_lite.plan.plan import CombinePlan, Op, Plan, PlannedTensor
from mergekit_lite.plan.serving import serving_lint
from mergekit_lite.sources.adapter import Adapter, AdapterKey
from mergekit_lite.sources.checkpoint import Checkpoint
from mergekit_lite.vocabulary import EXPERT_LAYOUTS, OP_ORDER, WHOLE_TENSOR, Layout

_OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def build_plan(
    ckpt: Checkpoint,
    adapters: list[Adapter],
    dtype: str,
    max_shard_bytes: int,
    combine: CombineSpec | None = None,
    fp8: Fp8Spec | None = None,
) -> Plan:
    """Map every adapter tensor onto the base; fix output names, shapes, dtypes and shards.

    With a `combine` method other than sum, each module's LoRA deltas become one delta of the
    combined adapter (adapter index len(adapters)), whose factors merge/combine.py computes in the merge.
    """
    to_fp8, dtype = dtype == FP8_DTYPE, DENSE_DTYPE if dtype == FP8_DTYPE else dtype
    ops: dict[str, list[Op]] = defaultdict(list)
    accounted: list[str] = []
    resolve = _Resolver(ckpt)
    for adapter in adapters:
        _ops_of_adapter(adapter, resolve, ops, accounted)
    tied_out = _reconcile_tied(ckpt, ops) if ckpt.tied and ckpt.output_embedding else ckpt.tied
    tensors = _output_tensors(ckpt, ops, dtype)
    head, emb = ckpt.output_embedding, ckpt.input_embedding
    if not tied_out and head in ops and head not in ckpt.tensors and emb is not None:
        tensors.append(_planned(head, ckpt.tensors[emb], sorted(ops[head], key=_op_order), dtype))
    unclaimed = set(ops) - {t.name for t in tensors}
    if unclaimed:
        raise PlanError(f"internal error: operations planned for unknown tensors {sorted(unclaimed)}")
    entries = {(a.index, k.key): k.entry for a in adapters for k in a.keys}
    by_index = {a.index: a for a in adapters}
    for t in tensors:
        _finalise(t, by_index, entries)
    base_shapes = {name: entry.shape for name, entry in ckpt.tensors.items()}
    if (
        combine is not None
        and combine.method != "sum"
        and any(op.layout in EXPERT_LAYOUTS for t in tensors for op in t.ops)
    ):
        raise PlanError(
            f"`combine: {combine.method}` of adapters with `target_parameters` on experts is not supported; "
            "merge them with the default `sum`"
        )
    combined = plan_combine(combine, ckpt.path, adapters, tensors, base_shapes) if combine is not None else None
    if combined is not None:
        _fold_combined(tensors, combined)
    quantization_config = None
    if to_fp8:
        tensors, quantization_config = plan_fp8(ckpt, tensors, fp8)
    shapes = {t.name: t for t in tensors}
    shard_names = _assign_shards(tensors, max_shard_bytes)
    rows = shapes[ckpt.input_embedding].shape[0] if ckpt.input_embedding in shapes else None
    return Plan(
        base=ckpt.path,
        adapters=[_adapter_summary(a) for a in adapters],
        tensors=tensors,
        shard_names=shard_names,
        tied_in=ckpt.tied,
        tied_out=tied_out,
        embedding_rows=rows,
        peak_bytes=peak_bytes(tensors, adapters, combined),
        accounted=accounted,
        combine=combined,
        serving=serving_lint(adapters),
        base_quantization=ckpt.quantization,
        quantization_config=quantization_config,
    )


class _Resolver:
    """Adapter module names (as PEFT saw the loaded model) -> the base's on-disk tensor names.

    Through the checkpoint's key mapping (transformers' own load-time renaming, sources/architecture.py);
    without one (an architecture transformers cannot build), a checkpoint may drop the top-level prefix.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.virtual = {ckpt.output_embedding} if ckpt.tied and ckpt.output_embedding not in ckpt.tensors else set()
        arch = ckpt.architecture
        self.to_disk = {module: disk for disk, module in arch.renames.items()}
        if arch.output_embedding and ckpt.output_embedding:
            self.to_disk.setdefault(arch.output_embedding, ckpt.output_embedding)
        if arch.input_embedding and ckpt.input_embedding:
            self.to_disk.setdefault(arch.input_embedding, ckpt.input_embedding)
        self.fused = arch.fused

    def __call__(self, target: str, key: AdapterKey, adapter: Adapter) -> str:
        self._refuse_tied_alias(target, key, adapter)
        disk = self.to_disk.get(target, target)
        if disk in self.ckpt.tensors or disk in self.virtual:
            return disk
        if target in self.fused:
            sources = self.fused[target]
            raise PlanError(
                f"{adapter.label}: `{key.key}` changes `{target}`, which transformers builds from "
                f"{len(sources)} checkpoint tensors (`{sources[0]}`, ...) of this "
                f"{self.ckpt.architecture.model_class or 'model'}; LoRA on fused tensors is not supported"
            )
        short = target.split(".", 1)[1] if "." in target else target
        if short in self.ckpt.tensors and self.ckpt.architecture.model_class is None:
            return short
        loads_as = self.ckpt.architecture.model_class
        raise PlanError(
            f"{adapter.label}: `{key.key}` changes `{target}`, which the base model does not have "
            "(is the adapter made for another base?)" + (f"; the base loads as {loads_as}" if loads_as else "")
        )

    def _refuse_tied_alias(self, target: str, key: AdapterKey, adapter: Adapter) -> None:
        """A module tied to others besides the input/output embedding pair (which the release unties
        when they part): PEFT changes what runs through that module alone, a merge all of them."""
        arch = self.ckpt.architecture
        others = arch.aliases.get(target, [])
        if target == arch.output_embedding or not set(others) - {arch.input_embedding, arch.output_embedding}:
            return
        module = target.rpartition(".")[0]
        raise PlanError(
            f"{adapter.label}: `{key.key}` changes `{target}`, which this {arch.model_class} ties to "
            f"{', '.join(f'`{o}`' for o in others)}: one tensor on disk. PEFT changes only what runs through "
            f"`{module}`, not through the modules tied to it, while a merge would change them all, so the "
            "release could not behave as the unmerged adapter does; adapt the layers instead"
        )


def _ops_of_adapter(adapter: Adapter, resolve: _Resolver, ops: dict[str, list[Op]], accounted: list[str]) -> None:
    by_module: dict[str, dict[str, AdapterKey]] = defaultdict(dict)
    replaced: dict[tuple[str, str], AdapterKey] = {}
    for key in adapter.keys:
        if key.kind == "original":  # PEFT's copy of the module before training: not a change
            accounted.append(key.key)
        elif key.kind in WHOLE_TENSOR:
            target = resolve(key.target, key, adapter)
            if (key.kind, target) in replaced:
                # With a resized vocabulary PEFT saves a modules_to_save tensor under two names
                # (`lm_head.weight` and `lm_head.modules_to_save.weight`): one op, the other accounted.
                first = replaced[key.kind, target]
                if first.entry.shape != key.entry.shape:
                    raise PlanError(
                        f"{adapter.label}: `{first.key}` and `{key.key}` both replace `{target}` with different shapes"
                    )
                accounted.append(key.key)
                continue
            replaced[key.kind, target] = key
            ops[target].append(Op(key.kind, adapter.index, (key.key,)))
        elif key.kind in by_module[key.module]:
            raise PlanError(f"{adapter.label}: two `{key.kind}` tensors for module `{key.module}`")
        else:
            by_module[key.module][key.kind] = key
    for module, kinds in by_module.items():
        _lora_ops(adapter, module, kinds, resolve, ops)


def _lora_ops(
    adapter: Adapter, module: str, kinds: dict[str, AdapterKey], resolve: _Resolver, ops: dict[str, list[Op]]
) -> None:
    label = adapter.label
    wrapped = experts.wrapped_parameter(adapter, module, resolve.ckpt.architecture)  # target_parameters
    scale = adapter.weight * adapter.scaling(wrapped or module)
    a, b = kinds.get("lora_A"), kinds.get("lora_B")
    ea, eb = kinds.get("emb_A"), kinds.get("emb_B")
    if (a is None) != (b is None) or (ea is None) != (eb is None):
        raise PlanError(f"{label}: module `{module}` has only one of its two LoRA factors")
    if a and ea:
        raise PlanError(f"{label}: module `{module}` has both linear and embedding LoRA factors")
    for extra in ("magnitude", "lora_bias"):
        if extra in kinds and a is None and ea is None:
            raise PlanError(f"{label}: `{kinds[extra].key}` has no LoRA factors to go with")
    if "tokens" in kinds:
        key = kinds["tokens"]
        indices = _token_indices(adapter, module, key)
        ops[resolve(key.target, key, adapter)].append(Op("rows", adapter.index, (key.key,), indices=indices))
    fa, fb = (a, b) if a else (ea, eb)
    if fa is None or fb is None:
        return
    if wrapped is not None and experts.stacked_shape(wrapped, resolve.ckpt.architecture) is not None:
        for target, op in experts.expert_ops(adapter, wrapped, fa, fb, scale, resolve.ckpt, resolve.to_disk):
            ops[target].append(op)
        return
    if len(fa.entry.shape) != 2 or len(fb.entry.shape) != 2 or fa.entry.shape[0] != fb.entry.shape[1]:
        raise PlanError(
            f"{label}: `{module}` factors have shapes {list(fa.entry.shape)} and {list(fb.entry.shape)}, "
            "which do not form a product B @ A (only Linear, Conv1D and Embedding layers are supported)"
        )
    rank = fa.entry.shape[0]
    want, _ = adapter.rank_alpha(wrapped or module)
    if rank != want:
        raise PlanError(
            f"{label}: `{module}` has rank {rank} in its tensors but adapter_config.json says r={want} "
            "(`r` or `rank_pattern`); the config and the weights do not belong together"
        )
    target = resolve(wrapped or fa.target, fa, adapter)
    layout: Layout = "embedding" if ea else "linear"
    if "magnitude" in kinds:
        if layout == "embedding":
            raise PlanError(f"{label}: DoRA on embedding `{module}` is not supported; merge it with PEFT")
        ops[target].append(Op("dora", adapter.index, (fa.key, fb.key, kinds["magnitude"].key), scale, layout))
    else:
        ops[target].append(Op("delta", adapter.index, (fa.key, fb.key), scale, layout))
    if "lora_bias" in kinds:
        key = kinds["lora_bias"]
        ops[resolve(key.target, key, adapter)].append(Op("delta", adapter.index, (key.key,), scale, "bias"))


def _token_indices(adapter: Adapter, module: str, key: AdapterKey) -> tuple[int, ...]:
    spec = adapter.config.get("trainable_token_indices")
    if isinstance(spec, list):
        indices = spec
    elif isinstance(spec, dict):
        matches = [v for k, v in spec.items() if module == k or module.endswith("." + k)]
        if len(matches) != 1:
            raise PlanError(f"{adapter.label}: `trainable_token_indices` has no single entry for `{module}`")
        indices = matches[0]
    else:
        raise PlanError(f"{adapter.label}: `{key.key}` needs `trainable_token_indices` in adapter_config.json")
    if not all(type(i) is int and i >= 0 for i in indices):
        raise PlanError(f"{adapter.label}: `trainable_token_indices` must be non-negative integers")
    if key.entry.shape[:1] != (len(indices),):
        raise PlanError(
            f"{adapter.label}: `{key.key}` holds {key.entry.shape[0] if key.entry.shape else 0} rows but "
            f"`trainable_token_indices` lists {len(indices)} tokens"
        )
    return tuple(indices)


def _output_tensors(ckpt: Checkpoint, ops: dict[str, list[Op]], dtype: str) -> list[PlannedTensor]:
    out = []
    for name, entry in ckpt.tensors.items():
        out.append(_planned(name, entry, sorted(ops.get(name, []), key=_op_order), dtype))
    return out


def _planned(name: str, entry: TensorEntry, ops: list[Op], dtype: str) -> PlannedTensor:
    out_dtype = entry.dtype
    if entry.dtype in FLOAT_DTYPES and dtype != "auto":
        out_dtype = _OUT_DTYPES[dtype]
    if ops and entry.dtype not in FLOAT_DTYPES:
        raise PlanError(f"`{name}` is stored as {entry.dtype}; LoRA changes to non-float tensors are not supported")
    quantized = entry.quant.method if entry.quant is not None else ""
    return PlannedTensor(name, entry.name, entry.dtype, out_dtype, entry.shape, ops, quantized=quantized)


def _op_order(op: Op) -> tuple[int, int]:
    return (op.adapter, OP_ORDER[op.kind])


def _reconcile_tied(ckpt: Checkpoint, ops: dict[str, list[Op]]) -> bool:
    """Whether a tied base stays tied: only while lm_head would still equal the embedding.

    PEFT ties a trainable-token adapter on the embedding to a tied lm_head, so token rows are
    mirrored onto lm_head; any other change to one side unties them. When they untie and the
    checkpoint stores only the embedding, lm_head gets its own tensor, starting from it.
    """
    emb, head = ckpt.input_embedding, ckpt.output_embedding
    assert head is not None
    if emb is None:
        raise PlanError("the base has tied embeddings but its input embedding cannot be found")
    emb_ops = ops.get(emb, [])
    stays_tied = not ops.get(head) and all(op.kind == "rows" for op in emb_ops)
    mirrored = [op for op in emb_ops if op.kind == "rows"]
    if not stays_tied:
        _refuse_lost_ties(ckpt)
    if head in ckpt.tensors or not stays_tied:
        ops[head] = ops.get(head, []) + mirrored
    return stays_tied


def _refuse_lost_ties(ckpt: Checkpoint) -> None:
    """Untied, some classes tie nothing else to the input embedding either (BART: its encoder's and
    decoder's `embed_tokens`); where the checkpoint does not store those, they would load uninitialised."""
    arch = ckpt.architecture
    inp, head = arch.input_embedding, arch.output_embedding
    if inp is None:
        return
    to_disk = {module: disk for disk, module in arch.renames.items()}
    kept = set(arch.untied_aliases.get(inp, []))
    lost = [
        a for a in arch.aliases.get(inp, []) if a != head and a not in kept and to_disk.get(a, a) not in ckpt.tensors
    ]
    if lost:
        raise PlanError(
            f"the adapters change `{head}` and `{inp}` apart, which unties them; this {arch.model_class} then no "
            f"longer ties {', '.join(f'`{a}`' for a in lost)} to `{inp}` either, and the checkpoint does not "
            "store them, so the release would load them uninitialised; untying it is not supported (adapt the layers)"
        )


def _finalise(t: PlannedTensor, adapters: dict[int, Adapter], entries: dict[tuple[int, str], TensorEntry]) -> None:
    """Check every op's tensors against the shape they meet; fix the output shape and each delta's layout."""
    shape = t.shape
    changed = False
    final: list[Op] = []
    for op in t.ops:
        where = f"{adapters[op.adapter].label}: `{op.keys[0]}`"
        shapes = [entries[op.adapter, k].shape for k in op.keys]
        first = shapes[0]
        if op.kind in WHOLE_TENSOR:
            if changed and (op.kind == "replace" or first != shape):
                raise PlanError(f"{where} replaces `{t.name}` whole, which would discard an earlier adapter's change")
            if not (first == shape or (len(first) == len(shape) == 2 and first[1] == shape[1])):
                raise PlanError(f"{where} has shape {list(first)}, which cannot replace `{t.name}` {list(shape)}")
            shape = first
        elif op.kind == "rows":
            if len(shape) != 2 or first[1:] != shape[1:] or max(op.indices, default=-1) >= shape[0]:
                raise PlanError(
                    f"{where}: token rows {list(first)} at indices up to {max(op.indices)} do not fit `{t.name}` {list(shape)}"
                )
        elif op.layout in EXPERT_LAYOUTS:  # checked against the expert tensor by experts.expert_ops
            if any(o.layout not in EXPERT_LAYOUTS for o in t.ops):
                raise PlanError(f"{where}: `{t.name}` has expert deltas and other changes; this is not supported")
        elif op.layout == "bias":
            if first != shape:
                raise PlanError(f"{where} has shape {list(first)} but `{t.name}` is {list(shape)}")
        else:
            op = replace(
                op, layout=_layout(op, shape, first, shapes[1], adapter=adapters[op.adapter], where=where, name=t.name)
            )
            if op.kind == "dora" and shapes[2] != (shape[0] if op.layout == "linear" else shape[1],):
                raise PlanError(f"{where}: DoRA magnitude {list(shapes[2])} does not fit `{t.name}` {list(shape)}")
        changed = changed or op.kind not in WHOLE_TENSOR
        final.append(op)
    t.shape = shape
    t.ops = final


def _layout(
    op: Op, shape: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...], *, adapter: Adapter, where: str, name: str
) -> Layout:
    """linear (W is [out, in]), conv1d (GPT-2, W is [in, out]) or embedding (W is [vocab, dim])."""
    product = (b[0], a[1])  # B @ A is [out, in]
    if op.layout == "embedding":
        if shape == product[::-1]:
            return "embedding"
    elif shape == product and shape == product[::-1]:
        return "conv1d" if adapter.config.get("fan_in_fan_out") else "linear"
    elif shape == product:
        return "linear"
    elif shape == product[::-1]:
        return "conv1d"
    raise PlanError(
        f"{where}: LoRA factors give a {product[0]}x{product[1]} delta, which does not fit `{name}` "
        f"{list(shape)} (is the adapter made for another base?)"
    )


def _fold_combined(tensors: list[PlannedTensor], combined: CombinePlan) -> None:
    """Replace each module's per-adapter LoRA deltas by one delta of the combined adapter."""
    by_target = {m.target: m for m in combined.modules}
    for t in tensors:
        module = by_target.get(t.name)
        if module is None:
            continue
        kept = [op for op in t.ops if op.kind == "base_layer"]  # checked against the base, not applied
        t.ops = kept + [Op("delta", combined.index, module.keys, module.scaling, module.layout)]


def _assign_shards(tensors: list[PlannedTensor], max_bytes: int) -> list[str]:
    """Greedy split in order, like huggingface_hub's: a tensor larger than the limit gets a shard of its own."""
    shard, size = 0, 0
    for t in tensors:
        if size and size + t.nbytes > max_bytes and not t.scale_of:  # FP8 block scales stay with their weight
            shard, size = shard + 1, 0
        t.shard = shard
        size += t.nbytes
    n = shard + 1
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _adapter_summary(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    variant = "dora" if cfg.get("use_dora") else ("rslora" if cfg.get("use_rslora") else "lora")
    return {
        "index": adapter.index,
        "path": str(adapter.path),
        "weight": adapter.weight,
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "variant": variant,
        "target_modules": cfg.get("target_modules"),
        "tensors": len(adapter.keys),
    }
