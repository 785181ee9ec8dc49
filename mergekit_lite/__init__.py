"""mergekit-lite: merge PEFT LoRA adapters into a base model, verified and packaged."""

from __future__ import annotations

from mergekit_lite._version import __version__
from mergekit_lite.errors import InputError, MergeError, MergekitError
from mergekit_lite.pipeline import run_merge, run_plan

__all__ = ["InputError", "MergeError", "MergekitError", "__version__", "run_merge", "run_plan"]
