"""How transformers builds a fused module tensor (MoE experts in 3-D parameters) from the
checkpoint's tensors, and which parameters a module holds, recorded as plain data.

`fusion[tensor]` is what `convert_and_load_state_dict_in_model` does to build `tensor`: the
converter's operations by name (`MergeModulelist(dim=0)` -> "stack:0", `Concatenate(dim=1)` ->
"cat:1", anything else by its class name) and, for each on-disk key, the index of the source
pattern it matched and its expert number (the `*` of that pattern). The plan (plan/experts.py)
turns these and the header shapes into the block of the fused tensor each on-disk tensor is.

`parameters[module]` lists, for a module whose parameters PEFT's `target_parameters` may wrap
one inside the other (a 3-D parameter, or several of two or more dimensions), each parameter's
name, module shape and whether experts are stored [experts, in, out] (`is_transposed`), in
registration order: PEFT wraps them in that order, the first one innermost.
"""

from __future__ import annotations

import re
from typing import Any

STACK, CAT = "stack", "cat"


def op_names(converter: Any) -> list[str]:
    """The converter's operations, "stack:<dim>" and "cat:<dim>" for the two a split can undo."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    names = []
    for op in converter.operations:
        if type(op) is MergeModulelist:
            names.append(f"{STACK}:{op.dim}")
        elif type(op) is Concatenate:
            names.append(f"{CAT}:{op.dim}")
        else:
            names.append(type(op).__name__)
    return names


def expert_number(pattern: str, key: str) -> int:
    """The expert a key is (the number the pattern's one `*` stands for); -1 when there is none."""
    if pattern.count("*") != 1:
        return -1
    found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    return int(found.group(1)) if found else -1


def record(fusion: dict[str, dict[str, Any]], converters: list[Any], name: str, key: str, pattern: str) -> None:
    """Add on-disk `key`, which the converter with source `pattern` turns into module tensor `name`."""
    converter = next((c for c in converters if pattern in c.source_patterns), None)
    if converter is None:
        return
    entry = fusion.setdefault(name, {"ops": op_names(converter), "sources": []})
    entry["sources"].append([key, list(converter.source_patterns).index(pattern), expert_number(pattern, key)])


def parameters(model: Any) -> dict[str, list[list[Any]]]:
    """Module -> [[parameter, shape, transposed], ...] where a ParamWrapper can nest (see above)."""
    found: dict[str, list[list[Any]]] = {}
    for name, module in model.named_modules():
        params = [(p, tuple(t.shape)) for p, t in module.named_parameters(recurse=False) if t.dim() >= 2]
        if any(len(shape) == 3 for _, shape in params) or len(params) > 1:
            transposed = bool(getattr(module, "is_transposed", False))
            found[name] = [[p, list(shape), transposed] for p, shape in params]
    return found


def valid(fusion: Any, params: Any) -> bool:
    """Whether cached `fusion` and `parameters` have the shapes written above."""
    if not isinstance(fusion, dict) or not isinstance(params, dict):
        return False
    for entry in fusion.values():
        if not isinstance(entry, dict) or set(entry) != {"ops", "sources"}:
            return False
        if not all(isinstance(o, str) for o in entry["ops"]):
            return False
        if not all(
            isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and all(type(i) is int for i in s[1:])
            for s in entry["sources"]
        ):
            return False
    for rows in params.values():
        if not isinstance(rows, list) or not all(
            isinstance(r, list)
            and len(r) == 3
            and isinstance(r[0], str)
            and isinstance(r[1], list)
            and all(type(d) is int for d in r[1])
            and type(r[2]) is bool
            for r in rows
        ):
            return False
    return True
