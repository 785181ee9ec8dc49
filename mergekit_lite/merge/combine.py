"""The combined adapter's factors (plan/combine.py plans it), computed when the merge or the gate asks.

`CombinedFactors` computes one module's combined factors (A, B) from the input factors
(mathops.combine_*), on the CPU in fp32; the merge then adds s_c B A like any LoRA delta. The
dare methods draw random masks: PEFT draws them from torch's global generator module after module
in the model's `named_modules` order, after the draws that initialise the new adapter's layers.
For the same masks, the first request replays those draws on a private generator and computes
every module in that order up front, holding the combined factors (the size of one adapter, in
fp32) until the merge ends. The other methods are computed module by module as the merge reaches
them.
"""

from __future__ import annotations

import math

import torch

from mergekit_lite.merge import mathops
from mergekit_lite.merge.factors import load_factor
from mergekit_lite.plan.plan import CombinedModule, CombinePlan
from mergekit_lite.sources.adapter import Adapter
from mergekit_lite.vocabulary import COMBINE_METHODS


class CombinedFactors:
    """The combined adapter's factors, computed on the CPU in fp32 when asked for, handed out on `device`."""

    def __init__(self, plan: CombinePlan, adapters: list[Adapter], device: torch.device | None = None) -> None:
        self.plan = plan
        self.device = device or torch.device("cpu")
        self.readers = {a.index: a.reader() for a in adapters}
        self.labels = {a.index: a.label for a in adapters}
        self.by_key = {key: (m, i) for m in plan.modules for i, key in enumerate(m.keys)}
        self.threads = torch.get_num_threads()  # the merge runs some of its threads on one: compute with all
        self._last: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._all: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def get_many(self, keys: tuple[str, ...]) -> list[torch.Tensor]:
        """The combined factors named `keys` (see CombinedModule.keys)."""
        out = []
        for key in keys:
            module, which = self.by_key[key]
            out.append(self.factors(module)[which].to(self.device))
        return out

    def factors(self, module: CombinedModule) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module, exactly as PEFT's add_weighted_adapter makes them on the CPU."""
        if COMBINE_METHODS[self.plan.effective].random:
            if self._all is None:
                self._all = self._all_in_peft_order()
            return self._all[module.module]
        if self._last is None or self._last[0] != module.module:
            self._last = (module.module, self._compute(module, None))
        return self._last[1]

    def _all_in_peft_order(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.plan.seed)
        for module in self.plan.modules:
            replay_init_draws(module, self.plan.rank, self.plan.init, generator)
        return {m.module: self._compute(m, generator) for m in self.plan.modules}

    def _compute(self, module: CombinedModule, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        traits = COMBINE_METHODS[plan.effective]
        inputs = [
            (self._load(i.adapter, i.lora_a), self._load(i.adapter, i.lora_b), i.scaling, i.weight)
            for i in module.inputs
        ]
        with mathops.intra_op_threads(self.threads):
            if traits.family == "cat":
                return mathops.combine_cat(inputs, module.rank)
            if traits.family == "svd":
                return mathops.combine_svd(
                    traits.task,
                    inputs,
                    module.layout != "linear",
                    plan.rank,
                    plan.density,
                    plan.majority_sign_method,
                    plan.svd_clamp,
                    plan.svd_full_matrices,
                    generator,
                )
            return mathops.combine_factorwise(traits.task, inputs, plan.density, plan.majority_sign_method, generator)

    def _load(self, index: int, key: str) -> torch.Tensor:
        return load_factor(self.readers[index], self.labels[index], key)

    def close(self) -> None:
        """Let go of the held factors."""
        self._last = self._all = None


def replay_init_draws(module: CombinedModule, rank: int, init: bool | str, generator: torch.Generator) -> None:
    """Draw from `generator` what PEFT 0.21's LoraLayer.update_layer draws from torch's global generator
    when add_weighted_adapter creates the combined adapter's layer for `module` (values discarded)."""
    fan_in, fan_out = module.in_features, module.out_features
    if module.layout == "embedding":
        torch.randn((rank, fan_in), generator=generator)  # lora_embedding_A
        torch.randn((fan_out, rank), generator=generator)  # lora_embedding_B
        if init:  # reset_lora_parameters: A zeroed, B drawn like nn.Embedding's weight
            torch.nn.init.normal_(torch.empty(fan_out, rank), generator=generator)
        return
    torch.nn.init.kaiming_uniform_(torch.empty(rank, fan_in), a=math.sqrt(5), generator=generator)  # nn.Linear(in, r)
    torch.nn.init.kaiming_uniform_(torch.empty(fan_out, rank), a=math.sqrt(5), generator=generator)  # nn.Linear(r, out)
    if init is True:
        torch.nn.init.kaiming_uniform_(torch.empty(rank, fan_in), a=math.sqrt(5), generator=generator)
    elif init == "gaussian":
        torch.nn.init.normal_(torch.empty(rank, fan_in), std=1 / rank, generator=generator)
