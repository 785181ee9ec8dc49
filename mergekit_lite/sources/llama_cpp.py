"""llama.cpp's `convert_hf_to_gguf.py`, run as users run it: a subprocess of this Python, with the
llama.cpp folder's own `gguf-py` first on its path (NO_LOCAL_GGUF unset), offline.

One runner for both of its callers: `output.gguf` (release/gguf.py) and the gate's llama.cpp
runtime check (gate/llama_cpp.py), each of which raises its own error from the line returned.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 3600


def run_converter(script: Path, folder: Path, out: Path, options: list[str], cwd: Path) -> str | None:
    """Convert the checkpoint in `folder` to the GGUF file `out` with `options` (`--outtype f32`, ...),
    working in `cwd`; None when the file was written, else the converter's last line of error output."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, not the installed one
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, str(script), str(folder), "--outfile", str(out), *options]
    run = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd)
    if run.returncode == 0 and out.is_file():
        return None
    return ([line for line in run.stderr.splitlines() if line.strip()] or ["no output"])[-1].strip()
