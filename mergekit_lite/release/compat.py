"""Make a staged release's tokenizer_config.json portable (the rules: plan/compat.py)."""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_lite.plan.compat import portable_tokenizer_config

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def make_tokenizer_portable(folder: Path) -> bool:
    """Rewrite `folder`'s tokenizer_config.json in the portable form; whether it changed."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    doc = json.loads(text)
    template = folder / CHAT_TEMPLATE_FILE
    portable = portable_tokenizer_config(doc, template.read_text(encoding="utf-8") if template.is_file() else None)
    if portable == doc:
        return False
    path.write_text(json.dumps(portable, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True
