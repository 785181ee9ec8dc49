"""The Linear weights transformers' FineGrainedFP8 quantizer converts in a dense base, found by its own code.

transformers (quantizers/quantizer_finegrained_fp8.py, integrations/finegrained_fp8.py) replaces
every module whose type is exactly `nn.Linear` with an FP8Linear, except those
`get_modules_to_not_convert` names: the output embedding (`lm_head`), tied weights, the model's last
parameter's module and its `_keep_in_fp32_modules`. MoE `.experts` modules and grouped linears it
converts its own way; mergekit-lite keeps them dense and names them among the modules not converted.
The model is built on the meta device, as sources/architecture.py does; nothing is read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from mergekit_lite.errors import PlanError
from mergekit_lite.sources.architecture import meta_model
from mergekit_lite.sources.checkpoint import Checkpoint


@dataclass(frozen=True)
class Fp8Targets:
    """Linear weights by on-disk name -> module name; the modules transformers keeps dense, and the
    `.experts` / grouped modules it would convert that mergekit-lite keeps dense too."""

    linears: dict[str, str]
    not_converted: list[str]
    kept_dense: list[str]


def fp8_targets(ckpt: Checkpoint, modules_to_not_convert: list[str] | None = None) -> Fp8Targets:
    """What transformers' FP8 quantizer would convert in the dense base `ckpt`, given FineGrainedFP8Config's
    `modules_to_not_convert` (None: its defaults; a list replaces them, as in transformers)."""
    import torch
    from transformers import AutoConfig
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    arch = ckpt.architecture
    if arch.model_class is None:
        raise PlanError(
            f"`dtype: float8_e4m3fn` picks the Linear weights as transformers' FP8 quantizer does, but transformers "
            f"cannot build a model for base `{ckpt.path}`; merge with `dtype: bfloat16`"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = meta_model(arch.model_class, AutoConfig.from_pretrained(ckpt.path))
    skip = HfQuantizer.get_modules_to_not_convert(model, modules_to_not_convert, model._keep_in_fp32_modules)
    to_disk = {module: disk for disk, module in arch.renames.items()}
    linears: dict[str, str] = {}
    kept: list[str] = []
    for name, module in model.named_modules():
        if not name or not should_convert_module(name, skip):
            continue
        if name.endswith(".experts") or (
            isinstance(module, torch.nn.Linear)
            and type(module) is not torch.nn.Linear
            and "GroupedLinear" in type(module).__name__
        ):
            kept.append(name)
        elif type(module) is torch.nn.Linear:
            disk = to_disk.get(f"{name}.weight", f"{name}.weight")
            if disk in ckpt.tensors:
                linears[disk] = name
    return Fp8Targets(linears, sorted(skip), kept)
