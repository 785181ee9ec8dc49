"""Stage 2, the inputs, read from headers and configs only: the base checkpoint (checkpoint.py),
the PEFT LoRA adapters (adapter.py), Hub repositories resolved to local snapshots (hub.py), and
the tokenizer that ships with the release (tokenizer.py).
"""
