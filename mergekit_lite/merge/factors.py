"""Adapter tensors as the math takes them: read on demand (pread), in fp32, refused if not finite."""

from __future__ import annotations

import torch

from mergekit_lite.errors import AdapterError
from mergekit_lite.io.reader import TensorReader
from mergekit_lite.merge import mathops


def require_finite(tensor: torch.Tensor, label: str, key: str) -> None:
    """Raise AdapterError (an input error: exit 2) when adapter tensor `key` holds NaN or Inf."""
    if not mathops.all_finite(tensor):
        raise AdapterError(f"{label}: `{key}` contains NaN or Inf values")


def load_factor(reader: TensorReader, label: str, key: str, device: torch.device | None = None) -> torch.Tensor:
    """Adapter tensor `key` in fp32 (on `device` when given), checked finite; `label` names the adapter."""
    tensor = reader.load(key).to(device=device, dtype=torch.float32)
    require_finite(tensor, label, key)
    return tensor
