"""Stage 6, the release folder around the merged shards: config files and the index (configs.py),
the model card (card.py), the resolved manifest, receipt and checksums (receipt.py), and the
atomic publish from a staging folder (publish.py).

The configs are written before the gate (stage 5) runs on the staged folder; the card and the
receipt, which carry the gate's figures, after it; nothing here imports the gate.
"""
