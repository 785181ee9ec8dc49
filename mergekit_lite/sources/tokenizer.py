"""Which tokenizer (and multimodal processor) ships with the release, and copying it verbatim."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from mergekit_lite.errors import ManifestError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


# a multimodal model's processor: image / video preprocessing and the processor's own settings
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def processor_source(tokenizer_folder: Path | None, base: Path) -> Path | None:
    """The folder the release's processor files come from: the tokenizer's when it ships any, else
    the base's; None when neither does."""
    for folder in (tokenizer_folder, base):
        if folder is not None and processor_files(folder):
            return folder
    return None


def processor_files(folder: Path) -> list[Path]:
    """The processor files present in a folder."""
    return [folder / n for n in PROCESSOR_FILES if (folder / n).is_file()]


def copy_processor(source: Path, dest: Path) -> list[Path]:
    """Copy the processor files byte for byte; return the copies."""
    copies = []
    for path in processor_files(source):
        shutil.copyfile(path, dest / path.name)
        copies.append(dest / path.name)
    return copies


def has_tokenizer(folder: Path) -> bool:
    """Whether a folder ships tokenizer files a transformers tokenizer can load."""
    return any(
        (folder / name).is_file()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )


def tokenizer_source(choice: str, base: Path, adapters: list[Path], resolve) -> Path | None:
    """The folder the release's tokenizer comes from: `adapter` (the first adapter that ships one,
    else the base), `base`, or a path; None only for `none` (a release without a tokenizer, which
    vLLM and TGI cannot serve without one passed separately, is published only when asked for)."""
    if choice == "none":
        return None
    if choice == "adapter":
        for folder in adapters:
            if has_tokenizer(folder):
                return folder
        if has_tokenizer(base):
            return base
        raise ManifestError(
            "`tokenizer: adapter`: neither the adapters nor the base ship a tokenizer; name a folder that has one "
            "(`tokenizer: <path>`), or set `tokenizer: none` to publish a release without a tokenizer"
        )
    folder = base if choice == "base" else resolve(choice)
    if not has_tokenizer(folder):
        raise ManifestError(f"`tokenizer: {choice}`: no tokenizer files in `{folder}`")
    return folder


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files present in a folder (chat templates in `additional_chat_templates/` included)."""
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        files += sorted(p for p in extra.glob("*.jinja") if p.is_file())
    return files


def copy_tokenizer(source: Path, dest: Path) -> list[Path]:
    """Copy the tokenizer files byte for byte; return the copies."""
    copies = []
    for path in tokenizer_files(source):
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copies.append(target)
    return copies


def load_tokenizer(folder: Path | None) -> Any:
    """A transformers tokenizer from a folder, or None when there is none."""
    if folder is None or not has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(folder)
