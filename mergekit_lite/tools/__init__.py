"""Around the pipeline, not stages of it: the bundled SmolLM2 example (example.py) and the
`make demo` script (demo.py), and the per-tensor diff of two checkpoints for reviews (diff.py).
"""
