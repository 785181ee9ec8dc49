"""mergekit-lite: merge PEFT LoRA adapters into a base model, verified and packaged."""

from __future__ import annotations

__version__ = "0.1.0"

from mergekit_lite.errors import InputError, MergeError, MergekitError  # noqa: E402
from mergekit_lite.pipeline import run_merge, run_plan  # noqa: E402

__all__ = ["InputError", "MergeError", "MergekitError", "__version__", "run_merge", "run_plan"]
