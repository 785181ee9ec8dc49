"""Gate check, structure: the release's config files against the source's, field by field.

config.json and generation_config.json are compared with the base's, tokenizer_config.json with
the tokenizer source's, recursively (nested mappings and equal-length lists element by element).
Every difference must be one that EXPLAINED lists, accepted for the values at hand by what the
plan says the release is (its dtype, embedding rows, tying, the tokenizer's EOS id); any other
fails the check, naming the file, the field and both values. A changed rope setting, a dropped
field or a stray one therefore fails here, however small its effect on the logits.

EXPLAINED is the one list of accepted differences: a stage that changes a config field on
purpose adds an entry here, with the reason, and the rule that checks the new value. The gate
computes the expected values from the plan itself, not through release/configs.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from mergekit_lite.gate.report import GateReport
from mergekit_lite.io.format import TORCH_NAMES
from mergekit_lite.plan.config import V5_ONLY_TOKENIZER_CLASSES, V5_ONLY_TOKENIZER_KEYS
from mergekit_lite.plan.plan import Plan

CHECK = "configs as the source, field by field"


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


MISSING: Any = _Missing()  # the value of a field one side does not have


@dataclass(frozen=True)
class Facts:
    """What the plan says the release is: the values an explained difference must have."""

    plan: Plan
    dtype: str | None  # the torch name of the release's float dtype ("bfloat16"), None without float tensors
    eos_ids: frozenset[int]  # EOS ids the release's tokenizer adds to generation_config (the source tokenizer's)
    candidate: Path  # the release folder (a rule may read a file beside the config, as chat_template.jinja)


@dataclass(frozen=True)
class Difference:
    """One differing field: its dotted path, both values (MISSING where absent), and the mappings
    that hold it on each side (for a rule that checks the new value against a sibling field)."""

    field: str
    old: Any
    new: Any
    source: dict[str, Any]
    release: dict[str, Any]


Rule = Callable[[Difference, Facts], bool]  # whether the difference is explained


@dataclass(frozen=True)
class Explained:
    """One accepted difference: in `file`, at a field matching `field` (fnmatch: `*.rope_theta`
    matches a sub-config's), when `accepts` says the values fit what the plan gives."""

    file: str
    field: str
    why: str
    accepts: Rule


def _ids(value: Any) -> list[Any]:
    return [] if value is MISSING or value is None else list(value) if isinstance(value, list) else [value]


def _eos_added(d: Difference, facts: Facts) -> bool:
    """The release's EOS ids are the source's, in order, plus only the tokenizer's EOS id."""
    before, after = _ids(d.old), _ids(d.new)
    return bool(after) and after[: len(before)] == before and set(after[len(before) :]) <= facts.eos_ids


def _rope(d: Difference) -> dict[str, Any]:
    rope = d.release.get("rope_parameters")
    return rope if isinstance(rope, dict) and not any(isinstance(v, dict) for v in rope.values()) else {}


def _v4_rope_key(key: str) -> Rule:
    """transformers 4's top-level copy of a `rope_parameters` value, added beside it (portable layout)."""
    return lambda d, f: d.old is MISSING and key in _rope(d) and _same(d.new, _rope(d)[key])


def _v4_rope_scaling(d: Difference, facts: Facts) -> bool:
    """transformers 4's `rope_scaling`: the release's `rope_parameters` less theta and the partial
    factor, or null for the default type (so that transformers 5 does not read it instead)."""
    rope = _rope(d)
    if not rope:
        return False
    names = ("rope_type", "type")
    scaled = set(rope) - {*names, "rope_theta", "partial_rotary_factor"}  # M-RoPE's `mrope_section`, ...
    if not scaled and all(rope.get(k, "default") == "default" for k in names):  # not M-RoPE's `type: mrope`
        return d.new is None
    return _same(d.new, {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")})


def _chat_template_inlined(d: Difference, facts: Facts) -> bool:
    template = facts.candidate / "chat_template.jinja"
    return d.old is MISSING and template.is_file() and d.new == template.read_text(encoding="utf-8")


def _specials_merged(d: Difference, facts: Facts) -> bool:
    """transformers 4's `additional_special_tokens`: the source's, then its v5 `extra_special_tokens` list."""
    extra = d.source.get("extra_special_tokens")
    if not isinstance(extra, list):
        return False
    return _same(d.new, list(dict.fromkeys([*_ids(d.old), *extra])))


def _version(d: Difference, facts: Facts) -> bool:
    return isinstance(d.new, str)


V4 = "transformers 4's layout beside v5's (`output.compat`)"

EXPLAINED: list[Explained] = [
    Explained("config.json", "dtype", "the output dtype", lambda d, f: f.dtype is not None and d.new == f.dtype),
    Explained(
        "config.json",
        "torch_dtype",
        "the output dtype, under transformers 4's name or dropped for v5's `dtype`",
        lambda d, f: d.new is MISSING or (f.dtype is not None and d.new == f.dtype),
    ),
    Explained(
        "config.json",
        "vocab_size",
        "the planned embedding rows (a resized vocabulary)",
        lambda d, f: f.plan.embedding_rows is not None and _same(d.new, f.plan.embedding_rows),
    ),
    Explained(
        "config.json",
        "tie_word_embeddings",
        "the output's tying (an adapter that changes the embedding or lm_head unties them)",
        lambda d, f: _same(d.new, f.plan.tied_out),
    ),
    Explained(
        "config.json",
        "quantization_config",
        "dense weights carry none; FP8 ones the plan's (`dtype: float8_e4m3fn`)",
        lambda d, f: d.new is MISSING if f.plan.quantization_config is None else d.new == f.plan.quantization_config,
    ),
    Explained("config.json", "transformers_version", "the library version that wrote the file", _version),
    *[
        Explained("config.json", pattern, f"{V4}: `rope_parameters.{key}`", _v4_rope_key(key))
        for key in ("rope_theta", "partial_rotary_factor")
        for pattern in (key, f"*.{key}")
    ],
    *[
        Explained("config.json", pattern, f"{V4}: from `rope_parameters`", _v4_rope_scaling)
        for pattern in ("rope_scaling", "*.rope_scaling")
    ],
    Explained("generation_config.json", "eos_token_id", "the shipped tokenizer's EOS id added", _eos_added),
    Explained("generation_config.json", "transformers_version", "the library version that wrote the file", _version),
    Explained(
        "tokenizer_config.json",
        "tokenizer_class",
        f"{V4}: a class transformers 4 has",
        lambda d, f: d.old in V5_ONLY_TOKENIZER_CLASSES and d.new == "PreTrainedTokenizerFast",
    ),
    *[
        Explained("tokenizer_config.json", key, f"{V4}: a transformers 5 save-time key", lambda d, f: d.new is MISSING)
        for key in V5_ONLY_TOKENIZER_KEYS
    ],
    Explained(
        "tokenizer_config.json",
        "extra_special_tokens",
        f"{V4}: moved to `additional_special_tokens`",
        lambda d, f: isinstance(d.old, list) and d.new is MISSING,
    ),
    Explained("tokenizer_config.json", "additional_special_tokens", V4, _specials_merged),
    Explained("tokenizer_config.json", "chat_template", f"{V4}: chat_template.jinja inlined", _chat_template_inlined),
]


def check_configs(
    report: GateReport, plan: Plan, candidate: Path, sources: dict[str, Path], eos_ids: frozenset[int] = frozenset()
) -> None:
    """Compare each of the release's config files with its source (`sources`: file name -> the
    folder of the source's copy); record one check naming every unexplained difference."""
    facts = Facts(plan, _dtype(plan), eos_ids, candidate)
    differences: list[str] = []
    explained: list[str] = []
    compared = 0
    for name, folder in sources.items():
        source_doc = _read(folder / name)
        release_doc = _read(candidate / name)
        if source_doc is MISSING and release_doc is MISSING:
            continue
        if isinstance(source_doc, str) or isinstance(release_doc, str):  # unreadable: the reason
            why = source_doc if isinstance(source_doc, str) else release_doc
            differences.append(f"{name}: {why}")
            continue
        if source_doc is MISSING or release_doc is MISSING:
            side = "the release" if release_doc is MISSING else "the source"
            differences.append(f"{name}: absent from {side}")
            continue
        compared += 1
        rules = [e for e in EXPLAINED if e.file == name]
        for d in _differences(source_doc, release_doc, ""):
            rule = next((e for e in rules if fnmatchcase(d.field, e.field) and e.accepts(d, facts)), None)
            if rule is not None:
                explained.append(f"{name}: {d.field} ({rule.why})")
            else:
                differences.append(
                    f"{name}: `{d.field}` is {_show(d.new)} in the release, {_show(d.old)} in the source"
                )
    report.context["config_differences_explained"] = explained
    report.add(
        "structure",
        CHECK,
        not differences,
        figure=len(differences),
        threshold=0,
        detail="; ".join(differences[:3]) + (f" (+{len(differences) - 3} more)" if len(differences) > 3 else ""),
    )


def _differences(a: dict[str, Any], b: dict[str, Any], path: str) -> list[Difference]:
    """Every leaf where the mappings `a` (source) and `b` (release) differ, recursing into nested
    mappings (and equal-length lists of mappings, as `[i]`)."""
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        field = f"{path}.{key}" if path else str(key)
        old, new = a.get(key, MISSING), b.get(key, MISSING)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _differences(old, new, field)
        elif _dict_lists(old, new):
            for i, (x, y) in enumerate(zip(old, new)):
                if isinstance(x, dict) and isinstance(y, dict):
                    out += _differences(x, y, f"{field}[{i}]")
                elif not _same(x, y):
                    out.append(Difference(f"{field}[{i}]", x, y, a, b))
        elif not _same(old, new):
            out.append(Difference(field, old, new, a, b))
    return out


def _dict_lists(a: Any, b: Any) -> bool:
    return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(isinstance(x, dict) for x in a)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1 and nested values compare the same way."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is MISSING or b is MISSING:
        return a is b
    if _number(a) and _number(b):
        return a == b
    return type(a) is type(b) and a == b


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _read(path: Path) -> Any:
    """The parsed JSON object, MISSING when there is no file, or a reason string when it cannot be read."""
    if not path.is_file():
        return MISSING
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"cannot be read ({exc})"
    return doc if isinstance(doc, dict) else f"is not a JSON object (a {type(doc).__name__})"


def _dtype(plan: Plan) -> str | None:
    """The torch name of the float dtype holding most of the release's bytes."""
    sizes: dict[str, int] = {}
    for t in plan.tensors:
        if t.dtype in TORCH_NAMES:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
    return TORCH_NAMES[max(sizes, key=sizes.__getitem__)] if sizes else None


def _show(value: Any) -> str:
    text = "(absent)" if value is MISSING else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
