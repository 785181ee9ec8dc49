"""The merge plan's data: plain dataclasses, built by build.py from headers and configs before any
tensor data is read, and read by every later stage (merge, gate, release).

Every adapter tensor is claimed by exactly one operation (Op) on one output tensor (PlannedTensor);
the Plan holds the output's tensors, dtypes and shards, and, when several adapters are combined
into one (`combine:` other than sum), the combined adapter (CombinePlan).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergekit_lite.io.format import ITEMSIZE
from mergekit_lite.sources.adapter import PREFIX
from mergekit_lite.vocabulary import COMBINE_METHODS, Layout, OpKind


@dataclass(frozen=True)
class Op:
    """One change of one adapter to one output tensor (the kinds and layouts: vocabulary.py)."""

    kind: OpKind
    adapter: int
    keys: tuple[str, ...]  # adapter tensor keys this op reads, in the order the math takes them
    scale: float = 1.0  # manifest weight * PEFT scaling, where it applies
    layout: Layout = ""
    indices: tuple[int, ...] = ()
    experts: int = 0  # layouts experts / experts_t: the number of experts E of the factors
    expert: int = -1  # the expert whose block the tensor is; -1: the tensor is all of them, [E, ...]
    block: tuple[int, ...] = ()  # (r0, r1, c0, c1): the part of the expert's block the tensor is; (): all


@dataclass
class PlannedTensor:
    """One output tensor: where its computation starts, its ops in the order they apply, its shard."""

    name: str
    source: str  # base tensor whose bytes start the computation
    src_dtype: str
    dtype: str
    shape: tuple[int, ...]
    ops: list[Op] = field(default_factory=list)
    shard: int = 0
    quantized: str = ""  # the source's quantization method (io/dequant.METHODS), "" when stored dense
    fp8_block: tuple[int, ...] = ()  # (rows, cols): written as FP8 e4m3 with these block scales (plan/fp8.py)
    scale_of: str = ""  # this is the `weight_scale_inv` of that FP8 tensor, planned right after it
    part: str = ""  # copied from this stored part of a quantized source (`weight`, `weight_scale_inv`)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def copied(self) -> bool:
        """Whether the output is the source's stored bytes (or those of its stored `part`), copied file to file."""
        if self.part:
            return not self.ops
        return not self.ops and self.dtype == self.src_dtype and not self.quantized and not self.scale_of

    @property
    def changed(self) -> bool:
        return bool(self.ops)


SHARD_METADATA = {"format": "pt"}  # every shard's header `__metadata__`, as transformers writes it


@dataclass
class Plan:
    base: Path
    adapters: list[dict[str, Any]]
    tensors: list[PlannedTensor]
    shard_names: list[str]
    tied_in: bool
    tied_out: bool
    embedding_rows: int | None
    peak_bytes: int
    accounted: list[str]  # adapter keys read but not applied (PEFT's copies of the original module)
    combine: CombinePlan | None = None  # several adapters combined into one (`combine:` other than sum)
    serving: list[dict[str, Any]] = field(default_factory=list)  # could each adapter be served unmerged (serving.py)
    base_quantization: str = ""  # how the base is stored quantized (merged into its dequantized values); "" if dense
    quantization_config: dict[str, Any] | None = None  # the release's config.json `quantization_config` (FP8)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def shard_entries(self, index: int) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of the tensors shard `index` holds, in the order they are written: its
        header, with SHARD_METADATA (the merge writes it; the gate predicts the layout from it)."""
        return [(t.name, t.dtype, t.shape) for t in self.tensors if t.shard == index]

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["base"] = str(self.base)
        doc["total_bytes"] = self.total_bytes
        return doc


@dataclass(frozen=True)
class CombinedInput:
    """One input adapter's factors at a module."""

    adapter: int
    lora_a: str  # key in the adapter file
    lora_b: str
    scaling: float  # PEFT's scaling of this adapter at this module
    weight: float  # the manifest weight


@dataclass(frozen=True)
class CombinedModule:
    """One module of the combined adapter."""

    module: str  # as named in the model, e.g. model.layers.0.self_attn.q_proj
    target: str  # the output tensor its delta goes to
    layout: Layout  # linear | conv1d | embedding
    in_features: int
    out_features: int
    rank: int  # rows of the combined A
    scaling: float  # PEFT's scaling of the combined adapter: 1 (alpha = r), or sqrt(r) with use_rslora
    inputs: tuple[CombinedInput, ...]

    @property
    def keys(self) -> tuple[str, str]:
        """The combined factors' names, as PEFT would save them."""
        if self.layout == "embedding":
            return f"{PREFIX}{self.module}.lora_embedding_A", f"{PREFIX}{self.module}.lora_embedding_B"
        return f"{PREFIX}{self.module}.lora_A.weight", f"{PREFIX}{self.module}.lora_B.weight"

    def work_bytes(self, method: str, full_matrices: bool) -> int:
        """Rough peak bytes of computing this module's factors: the inputs and their fp32 copies, the
        stacked and weighted tensors, and for the svd methods the deltas and U, S, V^T."""
        n = len(self.inputs)
        factors = (1 if method == "cat" else n) * self.rank * (self.in_features + self.out_features) * 4
        out = self.rank * (self.in_features + self.out_features) * 4
        if not COMBINE_METHODS[method].svd:
            return 4 * factors + out
        dense = self.in_features * self.out_features * 4
        small, large = sorted((self.in_features, self.out_features))
        svd = (large * large + small * small if full_matrices else 2 * large * small) * 4
        return factors + (n + 4) * dense + svd + out


@dataclass(frozen=True)
class CombinePlan:
    """The combined adapter, as PEFT's add_weighted_adapter would build it."""

    method: str  # as the manifest asks
    effective: str  # what PEFT runs: `linear` when there is a single adapter
    index: int  # the adapter index the plan's ops use for the combined adapter (the number of adapters)
    rank: int  # PEFT's r (and lora_alpha) of the new adapter
    density: float | None
    majority_sign_method: str
    svd_rank: int | None
    svd_clamp: float | None
    svd_full_matrices: bool
    seed: int
    init: bool | str  # init_lora_weights of the new adapter's layers (the first adapter's), replayed for dare
    modules: tuple[CombinedModule, ...]  # in the model's named_modules order

    def summary(self) -> dict[str, Any]:
        """The method and its parameters, for the model card and the receipt."""
        doc: dict[str, Any] = {"method": self.method, "rank": self.rank}
        if self.effective != self.method:
            doc["effective_method"] = self.effective
        taken = COMBINE_METHODS[self.effective].parameters
        if "density" in taken:
            doc["density"] = self.density
        if "majority_sign_method" in taken:
            doc["majority_sign_method"] = self.majority_sign_method
        if COMBINE_METHODS[self.effective].svd:
            doc.update(svd_rank=self.svd_rank, svd_clamp=self.svd_clamp, svd_full_matrices=self.svd_full_matrices)
        if "seed" in taken:
            doc["seed"] = self.seed
        return doc

    def held_bytes(self) -> int:
        """Bytes of combined factors held through the merge: all of them for dare, else none."""
        if not COMBINE_METHODS[self.effective].random:
            return 0
        return sum(m.rank * (m.in_features + m.out_features) * 4 for m in self.modules)
