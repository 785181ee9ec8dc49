"""The user's own evaluation data (`verify.eval`), read and tokenized at plan time.

A JSON Lines file, one record a line, as TRL's datasets and `datasets.Dataset.to_json` write them:
`{"text": "..."}` (language modelling) or `{"messages": [{"role": "user", "content": "..."}, ...]}`
(conversational, formatted with the tokenizer's chat template, the whole conversation scored).
Other keys are ignored; a key whose value is null counts as absent (`to_json` writes a column a
record lacks as null). Blank lines are skipped. Only the first `max_samples` records are read, each
cut to its first `max_length` tokens.

Every problem is an InputError naming the file and the line, raised before anything is merged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_lite.errors import InputError
from mergekit_lite.manifest.sections import EvalSpec

RECORD = "a record is a JSON object with `text` (a string) or `messages` (a list of {role, content})"


@dataclass(frozen=True)
class EvalData:
    """The records of an eval file as token ids, ready for the gate (gate/eval.py)."""

    file: str  # the file's name, as the report and the card show it
    sequences: tuple[tuple[int, ...], ...]  # each kept record's token ids (two or more: one is predicted)
    lines: tuple[int, ...]  # the line each came from
    records: int  # records read (kept or not)
    chat: int  # how many of them were `messages`
    too_short: int  # records of fewer than two tokens: nothing to predict, left out
    truncated: int  # records cut to max_length

    @property
    def tokens(self) -> int:
        """Tokens whose loss is measured: all but the first of each sequence."""
        return sum(len(s) - 1 for s in self.sequences)

    def describe(self) -> dict[str, Any]:
        """For the report's context."""
        return {
            "file": self.file,
            "records": self.records,
            "chat_records": self.chat,
            "scored_records": len(self.sequences),
            "scored_tokens": self.tokens,
            "records_too_short": self.too_short,
            "records_truncated": self.truncated,
        }


def read_eval(spec: EvalSpec, tokenizer: Any, where: str) -> EvalData:
    """Read and tokenize `spec.path` with `tokenizer` (the one the release ships); `where` is the
    manifest's `file:line` of `verify.eval`, for problems that are not inside the eval file."""
    path = Path(spec.path)
    if tokenizer is None:
        raise InputError(
            f"{where}: `verify.eval` needs a tokenizer to encode `{path.name}`, and the release ships none "
            "(`tokenizer: none`); name one with `tokenizer:`"
        )
    if not path.is_file():
        what = "is a folder, not a JSON Lines file" if path.is_dir() else "does not exist"
        raise InputError(f"{where}: `verify.eval.path`: `{path}` {what}")
    sequences: list[tuple[int, ...]] = []
    lines: list[int] = []
    records = chat = too_short = truncated = 0
    try:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if records >= spec.max_samples:
                    break
                if not raw.strip():
                    continue
                at = f"{path.name}:{number}"
                record = _parse(raw, at)
                ids, is_chat = _encode(record, tokenizer, at)
                records += 1
                chat += is_chat
                if len(ids) > spec.max_length:
                    ids, truncated = ids[: spec.max_length], truncated + 1
                if len(ids) < 2:
                    too_short += 1
                    continue
                sequences.append(tuple(ids))
                lines.append(number)
    except OSError as exc:
        raise InputError(f"{where}: cannot read `{path}`: {exc.strerror or exc}") from None
    if records == 0:
        raise InputError(f"{path.name}:1: no records: the file is empty or blank (one JSON object a line; {RECORD})")
    if not sequences:
        raise InputError(
            f"{path.name}:1: no record encodes to two tokens or more: there is no token whose loss could be measured"
        )
    return EvalData(path.name, tuple(sequences), tuple(lines), records, chat, too_short, truncated)


def require_language_model(model_class: str | None, config: dict[str, Any], where: str) -> None:
    """Refuse `verify.eval` for a model without a next-token loss (an encoder-decoder, a classifier)."""
    head = model_class or "AutoModelForCausalLM"
    if config.get("is_encoder_decoder") or any(k in head for k in ("Classification", "QuestionAnswering")):
        raise InputError(
            f"{where}: `verify.eval` measures the next-token loss of a decoder language model; "
            f"the base loads as {head}{' (an encoder-decoder)' if config.get('is_encoder_decoder') else ''}"
        )


def _parse(raw: bytes, at: str) -> dict[str, Any]:
    """One line as a JSON object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{at}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{at}: not valid JSON: {exc.msg} (column {exc.colno}); {RECORD}") from None
    if not isinstance(record, dict):
        raise InputError(f"{at}: {RECORD}; got a JSON {type(record).__name__}")
    return record


def _encode(record: dict[str, Any], tokenizer: Any, at: str) -> tuple[list[int], bool]:
    """The record's token ids, and whether it was a chat record."""
    text, messages = record.get("text"), record.get("messages")
    if text is not None and messages is not None:
        raise InputError(
            f"{at}: the record has both `text` and `messages`; give one (which is scored would be a guess)"
        )
    if text is None and messages is None:
        keys = ", ".join(f"`{k}`" for k in list(record)[:6]) or "none"
        raise InputError(f"{at}: the record has neither `text` nor `messages` (its keys: {keys}); {RECORD}")
    if text is not None:
        if not isinstance(text, str):
            raise InputError(f"{at}: `text` must be a string, got a JSON {type(text).__name__}")
        return list(tokenizer(text)["input_ids"]), False
    _check_messages(messages, at)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{at}: a `messages` record is formatted with the tokenizer's chat template, and the tokenizer "
            "has none; give `text` records, or a tokenizer with a chat template (`tokenizer:`)"
        )
    try:
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    except Exception as exc:  # noqa: BLE001  a template's own checks (roles must alternate, ...) raise anything
        raise InputError(f"{at}: the chat template cannot format these messages: {str(exc)[:200]}") from None
    ids = enc["input_ids"] if isinstance(enc, dict) else enc
    return list(ids), True


def _check_messages(messages: Any, at: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{at}: `messages` must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise InputError(f"{at}: `messages[{i}]` must be an object with a string `role` and a `content`")
