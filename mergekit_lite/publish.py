"""Atomic output: a staging folder beside the output, fsync'd, renamed into place at the end."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergekit_lite.errors import OutputError


def check_output(output: Path, inputs: list[Path], overwrite: bool, needed_bytes: int) -> None:
    """Refuse an output that exists, overlaps an input, or does not fit on its disk; write nothing."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"output `{output}` exists and is not a folder")
    for inp in inputs:
        if output == inp or output.is_relative_to(inp) or inp.is_relative_to(output):
            raise OutputError(f"output `{output}` overlaps input `{inp}`; choose a folder outside the inputs")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputError(f"output `{output}` exists and is not empty; set `output.overwrite: true` to replace it")
    anchor = output
    while not anchor.exists():
        anchor = anchor.parent
    free = shutil.disk_usage(anchor).free
    if free < needed_bytes:
        raise OutputError(f"output `{output}` needs {needed_bytes / 1e9:.2f} GB but its disk has {free / 1e9:.2f} GB free")


@contextmanager
def staging(output: Path) -> Iterator[Path]:
    """A fresh staging folder beside `output`, removed (with any parents made for it) unless published."""
    made = []
    parent = output.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    for folder in reversed(made):
        folder.mkdir()
    stage = output.parent / f".{output.name}.{secrets.token_hex(4)}.staging"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def publish(stage: Path, output: Path, overwrite: bool) -> None:
    """fsync the staged files and rename the folder into place, replacing an old release only now."""
    for path in stage.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(stage)
    old = None
    if output.exists():
        if any(output.iterdir()) and not overwrite:
            raise OutputError(f"output `{output}` appeared while merging; not replacing it")
        old = output.parent / f".{output.name}.{secrets.token_hex(4)}.old"
        os.rename(output, old)
    try:
        os.rename(stage, output)
    except BaseException:
        if old is not None:
            os.rename(old, output)
        raise
    _fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
