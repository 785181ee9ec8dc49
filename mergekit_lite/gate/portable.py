"""Gate check 4, packaging (portable layout): what transformers 4 reads says what transformers 5 reads.

A portable release (`output.compat`, the default) carries two layouts of the same facts. This check
reads the transformers 4 layout the way transformers 4 does (top-level `rope_theta`,
`partial_rotary_factor`, `rope_scaling`, `torch_dtype`) and the transformers 5 layout the way
transformers 5 does (`rope_parameters`, `dtype`), and fails on any difference: a value changed in
one layout only would otherwise load silently wrong on one of the two. It is written from the
readers' side, not from the release's writer (plan/compat.py): it does not share its code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergekit_lite.gate.report import GateReport
from mergekit_lite.plan.config import V5_ONLY_TOKENIZER_CLASSES, V5_ONLY_TOKENIZER_KEYS


def check_portable(report: GateReport, candidate: Path) -> None:
    """Record whether config.json's and tokenizer_config.json's two layouts agree."""
    try:
        config = json.loads((candidate / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # structure's config check reports it too
        config, unreadable = {}, f"config.json unreadable: {exc}"
    else:
        unreadable = ""
    problems, compared = config_disagreements(config) if isinstance(config, dict) else (["not an object"], [])
    problems = [unreadable] if unreadable else problems
    report.add(
        "packaging",
        "config.json: transformers 4 keys agree with v5's",
        not problems,
        figure=len(problems),
        threshold=0,
        detail="; ".join(problems[:3]) if problems else f"compared: {', '.join(compared) or 'nothing (one layout)'}",
    )
    path = candidate / "tokenizer_config.json"
    if not path.is_file():
        return
    template = candidate / "chat_template.jinja"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        chat = template.read_text(encoding="utf-8") if template.is_file() else None
    except (OSError, ValueError) as exc:
        problems = [f"unreadable: {exc}"]
    else:
        problems = tokenizer_config_problems(doc, chat) if isinstance(doc, dict) else ["not an object"]
    report.add(
        "packaging",
        "tokenizer_config.json readable by transformers 4",
        not problems,
        figure=len(problems),
        threshold=0,
        detail="; ".join(problems[:3]),
    )


def config_disagreements(config: dict[str, Any], where: str = "") -> tuple[list[str], list[str]]:
    """Differences between the v4 and v5 readings of a config (and its sub-configs); the fields compared."""
    problems: list[str] = []
    compared: list[str] = []
    for key, value in config.items():
        if isinstance(value, dict) and "rope_parameters" in value:
            more, seen = config_disagreements(value, f"{where}{key}.")
            problems += more
            compared += seen
    if "dtype" in config:
        compared.append(f"{where}dtype")
        if config.get("torch_dtype") != config["dtype"]:
            problems.append(f"{where}torch_dtype={config.get('torch_dtype')!r} but dtype={config['dtype']!r}")
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or not rope:
        return problems, compared
    if any(isinstance(v, dict) for v in rope.values()):
        compared.append(f"{where}rope_parameters (per layer type: no generic 4.x layout, not compared)")
        return problems, compared
    v5, v4 = _v5_reading(rope), _v4_reading(config)
    for name in sorted(set(v5) | set(v4)):
        compared.append(f"{where}{name}")
        if v5.get(name) != v4.get(name):
            problems.append(
                f"{where}{name}: transformers 4 reads {_shown(v4, name)}, transformers 5 {_shown(v5, name)}"
            )
    return problems, compared


def _shown(reading: dict[str, Any], name: str) -> str:
    return repr(reading[name]) if name in reading else "nothing (its own default)"


def _v5_reading(rope: dict[str, Any]) -> dict[str, Any]:
    """RoPE as transformers 5 takes it from `rope_parameters` (`type` is its old name for `rope_type`)."""
    out = {f"rope.{k}": v for k, v in rope.items() if k != "type"}
    out["rope.rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return out


def _v4_reading(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE as transformers 4 takes it: `rope_theta` and `partial_rotary_factor` at the top level, the
    scaling parameters from `rope_scaling` (null or absent: the default type)."""
    scaling = config.get("rope_scaling") or {}
    out = {f"rope.{k}": v for k, v in scaling.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
    out["rope.rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in config:
            out[f"rope.{key}"] = config[key]
    return out


def tokenizer_config_problems(doc: dict[str, Any], chat_template: str | None) -> list[str]:
    """What keeps transformers 4's AutoTokenizer from loading tokenizer_config.json as v5 does."""
    problems = []
    if doc.get("tokenizer_class") in V5_ONLY_TOKENIZER_CLASSES:
        problems.append(f"tokenizer_class {doc['tokenizer_class']!r} exists only in transformers 5")
    problems += [f"`{key}` is a transformers 5 save artefact" for key in V5_ONLY_TOKENIZER_KEYS if key in doc]
    if isinstance(doc.get("extra_special_tokens"), list):
        problems.append("`extra_special_tokens` is a list (transformers 4 wants `additional_special_tokens`)")
    if chat_template is not None and doc.get("chat_template") not in (None, chat_template):
        problems.append("`chat_template` differs from chat_template.jinja")
    return problems
