"""Reading outputs, writing manifests, and the ONE tolerance table used by every comparison."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# float32 outputs are written with a small max_shard_size to force several shards
SMALL_SHARD = "24KB"


def shard_size_for(dtype_name: str) -> str | None:
    return SMALL_SHARD if dtype_name == "float32" else None


# --------------------------------------------------------------------------- reading outputs


def shard_files(folder: Path) -> list[Path]:
    """The weight files of an output folder (one file, or the shards the index names)."""
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / SINGLE_NAME]


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder, read with ``safe_open`` (through the index if any).

    Checks on the way that the index and the shard headers agree both ways and that no tensor
    is stored twice.
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    tensors: dict[str, torch.Tensor] = {}
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        by_shard: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(name)
        for shard, names in sorted(by_shard.items()):
            with safe_open(folder / shard, framework="pt") as f:
                keys = set(f.keys())
                assert keys == names, f"{shard}: header {sorted(keys ^ names)} disagree with the index"
                for key in sorted(keys):
                    assert key not in tensors, f"{key} stored in two shards"
                    tensors[key] = f.get_tensor(key)
        return tensors
    assert (folder / SINGLE_NAME).exists(), f"no {SINGLE_NAME} nor {INDEX_NAME} in {folder}"
    with safe_open(folder / SINGLE_NAME, framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors


def load_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``save_pretrained`` folder (base models), same reader as the output."""
    return load_output(folder)


# --------------------------------------------------------------------------- manifests


def _rel(path: Path, start: Path) -> str:
    rel = os.path.relpath(Path(path).resolve(), Path(start).resolve())
    return rel if rel.startswith(".") else f"./{rel}"


def _has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def write_manifest(
    folder: Path,
    base: Path,
    adapters: list[Path | tuple[Path, float | None]],
    dtype: str,
    out_name: str = "out",
    max_shard_size: str | None = None,
    *,
    overwrite: bool | None = None,
    compat: bool | None = None,
    absolute: bool = False,
    name: str = "manifest.yaml",
    **sections: object,
) -> Path:
    """Write ``folder/name`` (manifest.yaml) and return its path: THE manifest writer of the tests.

    Input paths are relative to ``folder``, or absolute with ``absolute``. An adapter is a path
    (written in the short form) or ``(path, weight)``; a weight of ``None`` is the short form too.
    ``sections`` are further top-level keys (``verify``, ``combine``, ``executor``, ``tokenizer``,
    ...) in the order given; a section given as ``None`` is left out. When no input ships a
    tokenizer and none is named, ``tokenizer: none`` is written (the tool refuses to guess).
    """
    folder.mkdir(parents=True, exist_ok=True)

    def where(path: Path) -> str:
        return str(path) if absolute else _rel(path, folder)

    entries: list[object] = []
    for adapter in adapters:
        path, weight = adapter if isinstance(adapter, tuple) else (adapter, None)
        entries.append(where(path) if weight is None else {"path": where(path), "weight": float(weight)})
    output: dict[str, object] = {"path": f"./{out_name}"}
    if max_shard_size is not None:
        output["max_shard_size"] = max_shard_size
    if overwrite is not None:
        output["overwrite"] = overwrite
    if compat is not None:
        output["compat"] = compat
    manifest = {"base": where(base), "adapters": entries, "dtype": dtype, "output": output}
    manifest.update({key: value for key, value in sections.items() if value is not None})
    if "tokenizer" not in sections and not any(
        _has_tokenizer(p) for p in [base, *(a if isinstance(a, Path) else a[0] for a in adapters)]
    ):
        manifest["tokenizer"] = "none"  # the zoo's models ship none: a release without one must say so
    path = folder / name
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


# --------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tolerance:
    """|ours - ref| <= ulps * ulp_dtype(max(|ref|, M)) + floor_rel * max|ref| (elementwise).

    M is the largest magnitude PEFT rounds through for that element (``Oracle.magnitudes``):
    the base |W|, each adapter's delta and partial sum, and |f W| for DoRA.
    """

    ulps: float
    floor_rel: float


# THE tolerance table. float32: a few ulp (different but equally valid summation orders),
# plus a tiny floor relative to the tensor's largest magnitude for elements where the merge
# cancels. bf16/fp16: one ulp of the largest magnitude PEFT rounds through (PEFT rounds the
# base when loading it, and again after each adapter; we round once: the results may differ by
# one rounding step of that magnitude, never more).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(ulps=4, floor_rel=2e-7),
    torch.bfloat16: Tolerance(ulps=1, floor_rel=0.0),
    torch.float16: Tolerance(ulps=1, floor_rel=0.0),
}

# logits of the reloaded output against the unmerged PeftModel, float32 forward passes
LOGITS_ATOL_REL = 2e-5  # times max(1, max|ref logits|); observed <= 1e-6


# significand bits (hidden one included) and smallest normal exponent
_FORMAT = {torch.float32: (24, -126), torch.bfloat16: (8, -126), torch.float16: (11, -14)}
SLACK = 1 + 2.0**-10  # half an ulp, and a hair for the float64 reference's own error (~2^-45 relative)


def half_ulps(values: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|values - exact| in units of half an ulp of `exact`'s binade in `dtype` (float64 arithmetic)."""
    bits, emin = _FORMAT[dtype]
    exponent = torch.floor(torch.log2(exact.abs().clamp_min(2.0**emin))).clamp_min(emin)
    return (values.double() - exact).abs() / torch.exp2(exponent - bits)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at magnitude |x| (float64 result; subnormal spacing at 0)."""
    info = torch.finfo(dtype)
    mant = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    x = x.to(torch.float64).abs()
    _, exponent = torch.frexp(x)  # x = m * 2**e, 0.5 <= m < 1
    spacing = torch.pow(2.0, (exponent - 1 - mant).to(torch.float64))
    smallest = float(info.smallest_normal) * float(info.eps)
    return torch.clamp(spacing, min=smallest)


@dataclass
class Violation:
    name: str
    max_excess: float  # worst |diff| / allowed
    diff: float  # |diff| at that element
    ours: float
    ref: float
    base: float | None

    def __str__(self) -> str:
        return (
            f"{self.name}: |ours-ref|={self.diff:.3e} is {self.max_excess:.2f}x the tolerance "
            f"(ours={self.ours:.9g}, ref={self.ref:.9g}, base={self.base})"
        )


def tensor_violation(
    name: str, ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype
) -> Violation | None:
    """None when ``ours`` is within the tolerance of ``ref`` elementwise, else the worst element.

    ``base`` is the base magnitude that the tolerance may use (see ``Oracle.magnitudes``).
    """
    if ours.shape != ref.shape:
        return Violation(name, float("inf"), float("inf"), float("nan"), float("nan"), None)
    tol = TOLERANCES[dtype]
    o = ours.to(torch.float64)
    r = ref.to(torch.float64)
    mag = r.abs()
    if base is not None and base.shape == ref.shape:
        mag = torch.maximum(mag, base.to(torch.float64).abs())
    else:
        base = None
    allowed = tol.ulps * ulp(mag, dtype) + tol.floor_rel * float(r.abs().max()) if r.numel() else 0
    diff = (o - r).abs()
    if not torch.isfinite(o).all():
        return Violation(name, float("inf"), float("inf"), float("nan"), float("nan"), None)
    ratio = diff / allowed
    worst = int(torch.argmax(ratio))
    if float(ratio.flatten()[worst]) <= 1.0:
        return None
    flat_base = None if base is None else float(base.flatten()[worst])
    return Violation(
        name,
        float(ratio.flatten()[worst]),
        float(diff.flatten()[worst]),
        float(o.flatten()[worst]),
        float(r.flatten()[worst]),
        flat_base,
    )


def violations(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], base: dict[str, torch.Tensor], dtype: torch.dtype
) -> list[Violation]:
    """Per-tensor violations of the tolerance table, over the names of ``ref``.

    ``base``: per tensor, the base magnitudes (|W|, or elementwise max(|W|, |f W|) for DoRA).
    """
    found = []
    for name in sorted(ref):
        v = tensor_violation(name, ours[name], ref[name], base.get(name), dtype)
        if v is not None:
            found.append(v)
    return found


def mean_abs_error(values: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((values[k].to(torch.float64) - truth[k]).abs().mean()) for k in truth}


# --------------------------------------------------------------------------- PEFT oracle


def scale_adapter(model, adapter_name: str, weight: float) -> int:
    """Multiply every LoRA layer's ``scaling[adapter_name]`` by the manifest weight."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            module.scaling[adapter_name] *= weight
            count += 1
    return count


def untie_embeddings(model) -> None:
    """Give a tied model its own lm_head tensor (a copy), so PEFT merges into the right one."""
    import torch.nn as nn

    out = model.get_output_embeddings()
    out.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    text_config.tie_word_embeddings = False
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def attach_adapters(model, adapters: list[tuple[Path, float]]):
    """PeftModel with every adapter loaded under its own name, scaled, and all active."""
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name=names[0])
    for name, (path, _) in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    for name, (_, weight) in zip(names, adapters):
        if weight != 1.0:
            assert scale_adapter(peft_model, name, weight) > 0
    if len(names) > 1:
        peft_model.base_model.set_adapter(names)
    peft_model.eval()
    return peft_model, names


def merged_state_dict(peft_model, names: list[str]) -> dict[str, torch.Tensor]:
    merged = peft_model.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.to(torch.float64)


def dora_scaled_bases(peft_model) -> dict[str, torch.Tensor]:
    """For each DoRA-adapted weight, f * W with f = m / ||W + dW|| (rowwise, PEFT's own code).

    DoRA multiplies the base weight by f, so the rounding of the base that PEFT does when it
    loads it in a low precision is multiplied by f too: the magnitude that bounds the rounding
    difference between PEFT and a merge from the float32 base is |f W|, not |W|.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose

    scaled: dict[str, torch.Tensor] = {}
    inner = peft_model.base_model.model
    for module_name, module in inner.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in getattr(module, "lora_magnitude_vector", {}):
            weight = module.get_base_layer().weight.detach().to(torch.float32)
            delta = module.get_delta_weight(adapter).detach().to(torch.float32)
            fan = module.fan_in_fan_out
            with torch.no_grad():
                norm = module.lora_magnitude_vector[adapter].get_weight_norm(weight, transpose(delta, fan), scaling=1)
                factor = module.lora_magnitude_vector[adapter].weight.detach().float() / norm
            scaled[f"{module_name}.weight"] = transpose(factor.view(-1, 1), fan) * weight
    return scaled
