"""The merge math: pure functions on fp32 tensors. Each formula has exactly one home here."""

from __future__ import annotations

import torch


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, layout: str) -> torch.Tensor:
    """scale * B @ A in the layout of the weight it is added to.

    linear: W is [out, in], delta = B @ A. conv1d (GPT-2, fan_in_fan_out): W is [in, out], delta = (B @ A)^T.
    embedding: A is [r, vocab], B is [dim, r], W is [vocab, dim], delta = (B @ A)^T.
    """
    delta = lora_b @ lora_a
    delta.mul_(scale)
    return delta.T if layout in ("conv1d", "embedding") else delta


def add_delta(acc: torch.Tensor, delta: torch.Tensor) -> None:
    """acc += delta, in place."""
    acc.add_(delta)


def dora_merge(acc: torch.Tensor, unmerged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, layout: str) -> torch.Tensor:
    """DoRA: (m / ||W0 + dW||_row) * (acc + dW), norms taken per output feature of the unmerged weight W0.

    Matches PEFT's DoraLinearVariant.merge: the norm uses the weight without earlier adapters merged in,
    while the scaled sum includes them.
    """
    if layout == "conv1d":  # W stored [in, out]: output features are columns
        return dora_merge(acc.T, unmerged.T, delta.T, magnitude, "linear").T
    norm = torch.linalg.norm(unmerged + delta, dim=1)
    factor = (magnitude / norm).unsqueeze(1)
    return factor * (acc + delta)


def replace_rows(acc: torch.Tensor, indices: list[int] | tuple[int, ...], rows: torch.Tensor) -> None:
    """acc[indices] = rows, in place (trainable tokens)."""
    acc.index_copy_(0, torch.tensor(indices, dtype=torch.long), rows)


def round_to(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round once to the output dtype."""
    return acc.to(dtype)


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or infinite."""
    return bool(torch.isfinite(t).all())
