"""Gate check 1, structure: files, headers, index, names, shapes, dtypes, config. Headers only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergekit_lite.errors import MergekitError
from mergekit_lite.gate.report import GateReport
from mergekit_lite.io.format import TORCH_NAMES, TensorEntry, read_header
from mergekit_lite.plan.config import reconciled_config
from mergekit_lite.plan.plan import Plan

LEFTOVERS = ("base_model.model.", "lora_", "base_layer", "modules_to_save", "original_module", "trainable_tokens")
INDEX = "model.safetensors.index.json"


def check_structure(
    report: GateReport, plan: Plan, folder: Path, base_config: dict[str, Any], base_files: set[str] | None = None
) -> dict[str, TensorEntry]:
    """Record the structure checks; return the candidate's tensors by name (for the later checks)."""
    wanted = ["config.json"] + [n for n in ("generation_config.json",) if n in (base_files or set())]
    absent = [n for n in wanted if not (folder / n).is_file()]
    report.add(
        "structure", "config files shipped", not absent, figure=len(absent), threshold=0, detail=_few("missing", absent)
    )
    tensors, problems = _read_files(folder)
    report.add(
        "structure",
        "shard files parse strictly",
        not problems,
        figure=len(problems),
        threshold=0,
        detail="; ".join(problems[:2]),
    )
    expected = {t.name: t for t in plan.tensors}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    detail = "; ".join(filter(None, [_few("missing", missing), _few("unexpected", extra)]))
    report.add(
        "structure",
        "tensor names as planned",
        not missing and not extra,
        figure=len(missing) + len(extra),
        threshold=0,
        detail=detail,
    )
    leftovers = sorted(n for n in tensors if any(mark in n for mark in LEFTOVERS))
    report.add(
        "structure", "no PEFT names", not leftovers, figure=len(leftovers), threshold=0, detail=_few("found", leftovers)
    )
    wrong_shape = [n for n, t in expected.items() if n in tensors and tensors[n].shape != t.shape]
    report.add(
        "structure",
        "shapes as planned",
        not wrong_shape,
        figure=len(wrong_shape),
        threshold=0,
        detail=_few("", [f"{n} {list(tensors[n].shape)} != {list(expected[n].shape)}" for n in wrong_shape]),
    )
    wrong_dtype = [n for n, t in expected.items() if n in tensors and tensors[n].dtype != t.dtype]
    report.add(
        "structure",
        "dtypes as requested",
        not wrong_dtype,
        figure=len(wrong_dtype),
        threshold=0,
        detail=_few("", [f"{n} {tensors[n].dtype} != {expected[n].dtype}" for n in wrong_dtype]),
    )
    _check_config(report, plan, folder, base_config, tensors)
    return tensors


def _read_files(folder: Path) -> tuple[dict[str, TensorEntry], list[str]]:
    problems: list[str] = []
    tensors: dict[str, TensorEntry] = {}
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    index_path = folder / INDEX
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        try:
            doc = json.loads(index_path.read_text())
            weight_map = doc["weight_map"]
            total = doc["metadata"]["total_size"]
        except (ValueError, KeyError, TypeError) as exc:
            return {}, [f"{INDEX} is malformed ({exc})"]
        if sorted(set(weight_map.values())) != files:
            problems.append(f"{INDEX} names shards {sorted(set(weight_map.values()))} but the folder has {files}")
    elif files != ["model.safetensors"]:
        problems.append(f"expected model.safetensors or {INDEX}, found {files}")
    for name in files:
        try:
            header = read_header(folder / name)
        except MergekitError as exc:
            problems.append(str(exc))
            continue
        for key, entry in header.tensors.items():
            if key in tensors:
                problems.append(f"`{key}` is in both `{tensors[key].file.name}` and `{name}`")
            tensors[key] = entry
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in tensors or tensors[key].file.name != shard:
                problems.append(f"{INDEX} puts `{key}` in `{shard}`, which does not hold it")
        for key, entry in tensors.items():
            if key not in weight_map:
                problems.append(f"`{entry.file.name}` holds `{key}`, which {INDEX} does not list")
        actual = sum(e.nbytes for e in tensors.values())
        if total != actual:
            problems.append(f"{INDEX} total_size is {total} but the tensors hold {actual} bytes")
    return tensors, problems


def _check_config(
    report: GateReport, plan: Plan, folder: Path, base_config: dict[str, Any], tensors: dict[str, TensorEntry]
) -> None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        report.add("structure", "config.json consistent", False, figure="unreadable", threshold="", detail=str(exc))
        return
    want = reconciled_config(base_config, plan)
    problems = []
    for key in ("vocab_size", "tie_word_embeddings", "dtype"):
        if key in want and config.get(key) != want[key]:
            problems.append(f"{key}={config.get(key)!r}, the tensors need {want[key]!r}")
    planned = plan.quantization_config
    if planned is None and "quantization_config" in config:
        problems.append("quantization_config on dense weights")
    elif planned is not None and config.get("quantization_config") != planned:
        problems.append(f"quantization_config={config.get('quantization_config')!r}, the FP8 tensors need {planned!r}")
    floats = {TORCH_NAMES[e.dtype] for e in tensors.values() if e.dtype in TORCH_NAMES}
    if "dtype" in config and floats and config["dtype"] not in floats:
        problems.append(f"dtype={config['dtype']!r} but the tensors are {sorted(floats)}")
    report.add(
        "structure",
        "config.json consistent",
        not problems,
        figure=len(problems),
        threshold=0,
        detail="; ".join(problems),
    )


def _few(label: str, names: list[str], n: int = 3) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
    return f"{label} {shown}".strip()
