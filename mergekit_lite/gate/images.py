"""The end-to-end check's image prompt for a vision-language base: a fixed synthetic image and a
text prompt, made into model inputs by the base's own processor, so that a LoRA on the vision
tower or the projector runs end to end (text prompts never reach them).

The image is made in code, the same bytes on every run (IMAGE_SHA256): a 32x32 RGB picture with
a horizontal red gradient, a vertical green one and an 8-pixel blue checkerboard. The processor
(transformers' AutoProcessor, from the release's processor files, else the source's) resizes
and normalizes it and expands the image placeholder to as many tokens as the model takes; the
text is formatted with the processor's chat template when it has one, else the placeholder is
put before the text, as the processor expects (`processor.image_token`). Where AutoProcessor
cannot be built but the image processor can (Qwen2.5-VL's processor needs torchvision for its
video processor), the image processor's features are used with the model's own convention: as
many image-token ids as the vision tower gives embeddings for the image, wrapped in the config's
vision start / end (or begin / end of image) ids, before the chat-formatted text.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IMAGE_TEXT = "Describe this image."
IMAGE_SIZE = 32


def synthetic_image() -> Any:
    """The fixed image, as an [H, W, 3] uint8 numpy array."""
    import numpy as np

    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    red = x * 255 // (IMAGE_SIZE - 1)
    green = y * 255 // (IMAGE_SIZE - 1)
    blue = ((x // 8 + y // 8) % 2) * 255
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


IMAGE_SHA256 = hashlib.sha256(synthetic_image().tobytes()).hexdigest()
IMAGE_WORDS = (
    f"a {IMAGE_SIZE}x{IMAGE_SIZE} synthetic RGB image (gradients and a checkerboard, sha256 {IMAGE_SHA256[:12]})"
)


@dataclass
class ImagePrompt:
    """The image prompt's token ids and the other inputs the model takes with them (pixel values,
    image grid, token types); `how` says how it was made, `reason` why there is none (ids None)."""

    ids: torch.Tensor | None = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    how: str = ""
    reason: str = ""


def is_vision_language(config: Any) -> bool:
    """Whether a model config has a vision tower (what an image prompt is for)."""
    return getattr(config, "vision_config", None) is not None


def image_prompt(folder: Path | None, model: Any, tokenizer: Any) -> ImagePrompt:
    """The image prompt for `model` (a vision-language model: its config and, for the fallback, its
    vision tower) from the processor files in `folder`; an ImagePrompt without ids, with the
    reason, when none can be made."""
    if folder is None:
        return ImagePrompt(reason="the base ships no image processor (preprocessor_config.json)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _through_processor(folder, model)
        except Exception as exc:  # noqa: BLE001  AutoProcessor cannot be built here: the image processor alone
            why = f"AutoProcessor: {_said(exc)}"
        try:
            return _through_image_processor(folder, model, tokenizer, why)
        except Exception as exc:  # noqa: BLE001
            return ImagePrompt(
                reason=f"no input could be made from the processor files ({why}; AutoImageProcessor: {_said(exc)})"
            )


def _said(exc: Exception) -> str:
    """An exception in one line: its class and the first line of its message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def _through_processor(folder: Path, model: Any) -> ImagePrompt:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(f"{type(processor).__name__} has no image processor and tokenizer")
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}, {"type": "text", "text": IMAGE_TEXT}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        kind = "its chat template"
    else:
        text = f"{processor.image_token} {IMAGE_TEXT}"
        kind = f"its image token {processor.image_token!r} before the text"
    enc = processor(text=[text], images=[synthetic_image()], return_tensors="pt")
    ids, inputs = _split(enc, model)
    placeholders = int((ids == _image_token_id(model.config)).sum()) if _image_token_id(model.config) is not None else 0
    how = (
        f"{IMAGE_WORDS} and {IMAGE_TEXT!r} through {type(processor).__name__}, with {kind}; {placeholders} image tokens"
    )
    return ImagePrompt(ids, inputs, how)


def _through_image_processor(folder: Path, model: Any, tokenizer: Any, why: str) -> ImagePrompt:
    """The image processor's features, and the token ids the model expects with them: as many
    image-token ids as the vision tower gives embeddings, wrapped in the config's start / end ids,
    before the chat-formatted text."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    features = processor(images=[synthetic_image()], return_tensors="pt")
    config = model.config
    image_id = _image_token_id(config)
    if image_id is None:
        raise ValueError(f"the config of {type(model).__name__} names no image token id")
    accepted = set(inspect.signature(model.get_image_features).parameters)
    with torch.no_grad():
        out = model.get_image_features(**{k: v for k, v in dict(features).items() if k in accepted})
    embeddings = getattr(out, "pooler_output", out)
    parts = embeddings if isinstance(embeddings, list | tuple) else [embeddings]
    count = sum(int(torch.tensor(p.shape[:-1]).prod()) for p in parts)
    start = _first_int(config, ("vision_start_token_id", "boi_token_id", "boi_token_index"))
    end = _first_int(config, ("vision_end_token_id", "eoi_token_id", "eoi_token_index"))
    vocab = model.get_input_embeddings().weight.shape[0]
    image = [i for i in (start,) if i is not None and i < vocab] + [image_id] * count
    image += [i for i in (end,) if i is not None and i < vocab]
    if tokenizer is None:
        text: list[int] = []
        kind = "no text (no tokenizer)"
    elif getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": IMAGE_TEXT}], add_generation_prompt=True, return_dict=False
        )
        text, kind = list(enc["input_ids"] if isinstance(enc, dict) else enc), "the tokenizer's chat template"
    else:
        text, kind = list(tokenizer(IMAGE_TEXT)["input_ids"]), "plain text"
    ids = torch.tensor(image + text)
    inputs = {k: v for k, v in dict(features).items() if isinstance(v, torch.Tensor)}
    forward = set(inspect.signature(model.forward).parameters)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in forward:
            inputs[key] = (ids == image_id).long().unsqueeze(0)
            break
    inputs = {k: v for k, v in inputs.items() if k in forward}
    how = (
        f"{IMAGE_WORDS} through {type(processor).__name__} ({why}), {count} image tokens "
        f"(the vision tower's embeddings) before {IMAGE_TEXT!r} in {kind}"
    )
    return ImagePrompt(ids, inputs, how)


def _split(enc: Any, model: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The processor's output as 1-D token ids and the other inputs the model's forward takes
    (the attention mask left out: one sequence, every position attended)."""
    forward = set(inspect.signature(model.forward).parameters)
    ids = enc["input_ids"][0]
    inputs = {
        k: v
        for k, v in dict(enc).items()
        if k not in ("input_ids", "attention_mask") and k in forward and isinstance(v, torch.Tensor)
    }
    return ids, inputs


def _first_int(config: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if type(value) is int:
            return value
    return None


def _image_token_id(config: Any) -> int | None:
    return _first_int(config, ("image_token_id", "image_token_index"))


def per_token(inputs: dict[str, torch.Tensor], length: int) -> set[str]:
    """The inputs with one value per token (token types), which a longer sequence extends."""
    return {k for k, v in inputs.items() if v.dim() == 2 and v.shape == (1, length) and k.endswith("token_type_ids")}


def extended(inputs: dict[str, torch.Tensor], length: int, more: int) -> dict[str, torch.Tensor]:
    """`inputs` for the prompt followed by `more` text tokens: the per-token ones padded with 0 (text)."""
    keys = per_token(inputs, length)
    return {k: torch.cat([v, v.new_zeros((1, more))], dim=1) if k in keys else v for k, v in inputs.items()}
