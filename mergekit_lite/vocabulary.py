"""The words every stage shares, defined once: what an adapter tensor is, what the plan does to a
tensor, in which layout, and how several adapters can be combined.

Adapter tensor kinds (sources/adapter.py classifies each key of an adapter file):
  lora_A, lora_B    a Linear or Conv1D layer's LoRA factors (`.lora_A.weight`, `.lora_B.weight`)
  emb_A, emb_B      an Embedding's LoRA factors (`.lora_embedding_A`, `.lora_embedding_B`)
  lora_bias         the bias of lora_B (`lora_bias: true`)
  magnitude         DoRA's magnitude vector
  tokens            trainable-token rows (`trainable_token_indices`)
  base_layer        PEFT's saved copy of a targeted layer (a resized embedding)
  replace           a whole tensor that replaces the base's (modules_to_save, `bias: all / lora_only`)
  original          PEFT's copy of a module before training: read, checked, never applied

Operation kinds (plan/plan.py's Op.kind), applied in this order within one adapter (OP_ORDER):
  replace      the tensor is replaced whole (modules_to_save, bias all/lora_only)
  base_layer   PEFT's saved copy of a targeted embedding: replaces it when resized, else must equal it
  delta        W += scale * B @ A, in a layout (below); with layout `bias`, b += scale * lora_B.bias
  dora         DoRA: W = m / ||W0 + dW|| * (W + dW)
  rows         W[indices] = rows (trainable tokens)
Every op of an adapter has scale = manifest weight * PEFT scaling where it applies.

Layouts of a delta (Op.layout; "" for the ops that are not deltas):
  linear       W is [out, in], delta = B @ A
  conv1d       GPT-2's Conv1D (fan_in_fan_out): W is [in, out], delta = (B @ A)^T
  embedding    A is [r, vocab], B is [dim, r], W is [vocab, dim], delta = (B @ A)^T
  bias         a bias vector, delta = scale * lora_B.bias
  experts      PEFT's ParamWrapper on a parameter of E experts stored [E, out, in] (`target_parameters`):
               A is [E r, in], B is [out, E r], expert e's delta is B_e @ A_e (plan/experts.py); the
               tensor is the fused [E, out, in] (Op.expert -1), or expert Op.expert's block of it
               (Op.block: rows r0:r1, columns c0:c1 of that expert's [out, in]), stored one by one
  experts_t    the same on experts stored [E, in, out] (the module's `is_transposed`, gpt-oss):
               expert e's delta is (B_e @ A_e)^T, a block is of its [in, out]

Combine methods (`combine:` in the manifest): COMBINE_METHODS below, one row per method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KeyKind = Literal[
    "lora_A", "lora_B", "emb_A", "emb_B", "lora_bias", "magnitude", "tokens", "base_layer", "replace", "original"
]
OpKind = Literal["replace", "base_layer", "delta", "dora", "rows"]
Layout = Literal["", "linear", "conv1d", "embedding", "bias", "experts", "experts_t"]

OP_ORDER: dict[OpKind, int] = {"replace": 0, "base_layer": 1, "delta": 2, "dora": 2, "rows": 3}
WHOLE_TENSOR: tuple[OpKind, ...] = ("replace", "base_layer")  # ops that give a tensor's value whole
LORA_LAYOUTS: tuple[Layout, ...] = ("linear", "conv1d", "embedding")  # deltas made of two factors B @ A
EXPERT_LAYOUTS: tuple[Layout, ...] = ("experts", "experts_t")  # PEFT's ParamWrapper on stacked experts

# The parameters a combine method may take, in the order the manifest's checks name them.
COMBINE_PARAMETERS = ("density", "majority_sign_method", "svd_rank", "svd_clamp", "svd_full_matrices", "seed")
_SVD = ("svd_rank", "svd_clamp", "svd_full_matrices")


Family = Literal["sum", "cat", "factorwise", "svd"]


@dataclass(frozen=True)
class CombineMethod:
    """One way of combining several adapters, and what the plan and the math need to know of it.

    `family` says how the factors are computed (merge/combine.py): `sum` adds each adapter's delta
    (no combined adapter at all), `cat` stacks the factors, `factorwise` combines A and B
    separately with PEFT's task-vector merge `task`, `svd` combines the deltas with `task` and
    truncates them by SVD. `same_rank`: PEFT stacks the factors, so the adapters need one rank.
    `peft_name`: PEFT's `combination_type` (None: not a PEFT method).
    """

    name: str
    family: Family
    parameters: tuple[str, ...] = ()
    same_rank: bool = False
    task: str | None = None  # peft.utils.merge_utils' merge (linear = task_arithmetic), for factorwise and svd
    peft_name: str | None = None

    @property
    def needs_density(self) -> bool:
        """`density` is required, not only allowed."""
        return "density" in self.parameters

    @property
    def random(self) -> bool:
        """Draws random masks (dare), from a generator seeded with `seed`."""
        return "seed" in self.parameters

    @property
    def svd(self) -> bool:
        return self.family == "svd"


def _method(
    name: str, family: Family, parameters: tuple[str, ...] = (), same_rank: bool = False, task: str | None = None
) -> CombineMethod:
    return CombineMethod(name, family, parameters, same_rank, task, None if family == "sum" else name)


_TIES = ("density", "majority_sign_method")
_DARE = ("density", "seed")
_DARE_TIES = ("density", "majority_sign_method", "seed")

# THE table of combine methods, in the order the schema lists them.
COMBINE_METHODS: dict[str, CombineMethod] = {
    m.name: m
    for m in (
        _method("sum", "sum"),
        _method("cat", "cat"),
        _method("linear", "factorwise", same_rank=True, task="linear"),
        _method("svd", "svd", _SVD, task="linear"),
        _method("ties", "factorwise", _TIES, same_rank=True, task="ties"),
        _method("ties_svd", "svd", _TIES + _SVD, task="ties"),
        _method("dare_linear", "factorwise", _DARE, same_rank=True, task="dare_linear"),
        _method("dare_ties", "factorwise", _DARE_TIES, same_rank=True, task="dare_ties"),
        _method("dare_linear_svd", "svd", ("density", *_SVD, "seed"), task="dare_linear"),
        _method("dare_ties_svd", "svd", ("density", "majority_sign_method", *_SVD, "seed"), task="dare_ties"),
        _method("magnitude_prune", "factorwise", ("density",), same_rank=True, task="magnitude_prune"),
        _method("magnitude_prune_svd", "svd", ("density", *_SVD), task="magnitude_prune"),
    )
}
COMBINE_NAMES = tuple(COMBINE_METHODS)  # `combine.method` in the manifest's schema, in this order


def methods_taking(parameter: str) -> tuple[str, ...]:
    """The methods that take `parameter`, in the table's order."""
    return tuple(m.name for m in COMBINE_METHODS.values() if parameter in m.parameters)
