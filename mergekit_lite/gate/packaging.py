"""Gate check 4, packaging: the shipped tokenizer behaves exactly like its source, and the
multimodal processor files are the source's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergekit_lite.gate.report import GateReport
from mergekit_lite.sources.tokenizer import load_tokenizer, processor_files


def check_packaging(
    report: GateReport, candidate: Path, source: Any, texts: list[str], embedding_rows: int | None
) -> None:
    """Compare the packaged tokenizer with the source tokenizer on vocabulary, prompts and template."""
    try:
        packaged = load_tokenizer(candidate)
    except Exception as exc:  # noqa: BLE001  a broken shipped tokenizer fails the check, it does not crash the gate
        report.add(
            "packaging",
            "tokenizer shipped",
            False,
            figure="unloadable",
            threshold="loads",
            detail=f"{type(exc).__name__}: {exc}"[:200],
        )
        return
    if packaged is None:
        report.add(
            "packaging",
            "tokenizer shipped",
            False,
            figure="missing",
            threshold="present",
            detail="the source has a tokenizer",
        )
        return
    vocab_diff = _vocab_difference(source.get_vocab(), packaged.get_vocab())
    report.add(
        "packaging",
        "vocabulary equals the source",
        not vocab_diff,
        figure=len(vocab_diff),
        threshold=0,
        detail=", ".join(vocab_diff[:3]),
    )
    mismatched = []
    for text in texts:
        variants = [(text, source(text)["input_ids"], packaged(text)["input_ids"])]
        if getattr(source, "chat_template", None):
            chat = [{"role": "user", "content": text}]
            shipped = _chat(packaged, chat) if getattr(packaged, "chat_template", None) else None
            variants.append((f"chat: {text}", _chat(source, chat), shipped))
        mismatched += [label for label, a, b in variants if b is None or list(a) != list(b)]
    report.add(
        "packaging",
        "prompts encode as with the source",
        not mismatched,
        figure=len(mismatched),
        threshold=0,
        detail=f"first: {mismatched[0]!r}" if mismatched else "",
    )
    if embedding_rows is not None:
        report.add(
            "packaging",
            "len(tokenizer) <= embedding rows",
            len(packaged) <= embedding_rows,
            figure=len(packaged),
            threshold=embedding_rows,
        )
    special = _special_difference(source, packaged)
    report.add(
        "packaging",
        "special tokens as the source",
        not special,
        figure=len(special),
        threshold=0,
        detail="; ".join(special[:3]),
    )
    had = bool(getattr(source, "chat_template", None))
    same = getattr(packaged, "chat_template", None) == getattr(source, "chat_template", None)
    report.add(
        "packaging",
        "chat template as the source",
        same,
        figure="present" if packaged.chat_template else "absent",
        threshold="present" if had else "absent",
    )
    generation = candidate / "generation_config.json"
    if generation.is_file() and packaged.eos_token_id is not None:
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos]
        report.add(
            "packaging",
            "generation_config has the EOS id",
            packaged.eos_token_id in ids,
            figure=ids,
            threshold=packaged.eos_token_id,
        )


def check_processor_files(report: GateReport, candidate: Path, source: Path) -> None:
    """The release ships the source's processor files (preprocessor_config.json, ...), byte for byte."""
    wrong = []
    for path in processor_files(source):
        shipped = candidate / path.name
        if not shipped.is_file():
            wrong.append(f"{path.name} missing")
        elif shipped.read_bytes() != path.read_bytes():
            wrong.append(f"{path.name} differs from `{path}`")
    report.add(
        "packaging",
        "processor files as the source",
        not wrong,
        figure=len(wrong),
        threshold=0,
        detail="; ".join(wrong[:3]),
    )


def _chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    return list(enc["input_ids"] if isinstance(enc, dict) else enc)


def _special_difference(source: Any, packaged: Any) -> list[str]:
    """Special tokens (bos, eos, pad, unk, ...) that differ in text or id."""
    out = []
    for name in sorted(set(source.special_tokens_map) | set(packaged.special_tokens_map)):
        a, b = source.special_tokens_map.get(name), packaged.special_tokens_map.get(name)
        if a != b:
            out.append(f"{name}: {a!r} vs {b!r}")
    if sorted(source.all_special_ids) != sorted(packaged.all_special_ids):
        out.append(f"special ids {sorted(source.all_special_ids)} vs {sorted(packaged.all_special_ids)}")
    return out


def _vocab_difference(a: dict[str, int], b: dict[str, int]) -> list[str]:
    diff = [f"{tok!r}: {a.get(tok)} vs {b.get(tok)}" for tok in sorted(set(a) | set(b)) if a.get(tok) != b.get(tok)]
    return diff
