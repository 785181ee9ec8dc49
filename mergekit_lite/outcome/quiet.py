"""Keep other libraries' chatter off the user's screen: import-time log lines, warnings, loading bars.

With bitsandbytes installed (every QLoRA user) its CPU backend logs "Failed to load CPU
gemm_4bit_forward from kernels-community ..." at import on CPUs with AVX512-BF16; transformers
warns about generation settings and deprecated arguments when the gate loads models. None of it
is about the user's merge. Our own warnings (the `mergekit_lite` logger) are untouched, and so is
anything at ERROR or above.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# loggers (and the packages whose Python warnings) are held to errors
THIRD_PARTY = ("bitsandbytes", "transformers", "accelerate", "peft", "huggingface_hub", "torch", "safetensors")


def silence_third_party() -> None:
    """Hold third-party loggers to ERROR and drop their warnings; turn off the hub's loading bars.

    Works whether or not they are imported yet: transformers and huggingface_hub read their
    variables at import, and are told directly when a program calling main() imported them first.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    pattern = "|".join(THIRD_PARTY)
    warnings.filterwarnings("ignore", module=rf"({pattern})(\.|$)")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
