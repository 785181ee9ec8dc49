"""Per-tensor change between two checkpoints (for example a base and its release), for reviews."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_lite.errors import CheckpointError
from mergekit_lite.io.reader import TensorReader
from mergekit_lite.sources.checkpoint import read_tensors


@dataclass
class TensorChange:
    """How one tensor differs: relative Frobenius change ||B - A|| / ||A||, and the largest element change."""

    name: str
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    relative: float | None
    max_abs: float | None
    note: str = ""


def diff_checkpoints(a: Path, b: Path) -> list[TensorChange]:
    """Compare every tensor of two safetensors folders, one tensor at a time; largest change first."""
    for folder in (a, b):
        if not folder.is_dir():
            raise CheckpointError(f"`{folder}` is not a checkpoint folder")
    _, left = read_tensors(a)
    _, right = read_tensors(b)
    read_a, read_b = TensorReader(left), TensorReader(right)
    rows = []
    for name in sorted(set(left) | set(right)):
        ea, eb = left.get(name), right.get(name)
        if ea is None or eb is None:
            rows.append(
                TensorChange(
                    name, ea and ea.shape, eb and eb.shape, None, None, "only in " + ("B" if ea is None else "A")
                )
            )
            continue
        ta, tb = read_a.get(name).to(torch.float64), read_b.get(name).to(torch.float64)
        note = "" if ea.dtype == eb.dtype else f"{ea.dtype} -> {eb.dtype}"
        if ta.shape != tb.shape:
            rows_common = min(ta.shape[0], tb.shape[0])
            if ta.dim() == tb.dim() and ta.shape[1:] == tb.shape[1:]:
                note = f"resized {ta.shape[0]} -> {tb.shape[0]} rows; compared the first {rows_common}"
                ta, tb = ta[:rows_common], tb[:rows_common]
            else:
                rows.append(TensorChange(name, ea.shape, eb.shape, None, None, "shape changed"))
                continue
        delta = tb - ta
        norm = float(ta.norm())
        relative = float(delta.norm()) / norm if norm > 0 else (0.0 if float(delta.norm()) == 0 else float("inf"))
        rows.append(
            TensorChange(name, ea.shape, eb.shape, relative, float(delta.abs().max()) if delta.numel() else 0.0, note)
        )
    return sorted(rows, key=lambda r: (r.relative is not None, r.relative or 0.0), reverse=True)


def diff_table(rows: list[TensorChange], top: int | None) -> str:
    """Rows as an aligned table; unchanged tensors are summarised in one line."""
    changed = [r for r in rows if r.relative is None or r.relative > 0]
    shown = changed if top is None else changed[:top]
    table = [("tensor", "shape", "rel. change", "max |change|", "note")]
    for r in shown:
        shape = "x".join(map(str, r.shape_b or r.shape_a or ()))
        rel = "-" if r.relative is None else f"{r.relative:.3e}"
        mx = "-" if r.max_abs is None else f"{r.max_abs:.3e}"
        table.append((r.name, shape, rel, mx, r.note))
    widths = [max(len(t[i]) for t in table) for i in range(4)]
    lines = ["  ".join(t[i].ljust(widths[i]) for i in range(4)) + ("  " + t[4] if t[4] else "") for t in table]
    if len(shown) < len(changed):
        lines.append(f"... and {len(changed) - len(shown)} more changed tensors")
    lines.append(f"{len(changed)} of {len(rows)} tensors differ; {len(rows) - len(changed)} identical")
    return "\n".join(lines)
