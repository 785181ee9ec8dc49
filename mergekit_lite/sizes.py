"""Sizes in bytes: parsed as a manifest writes them (`5GB`, `200KiB`) and shown as people read them."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: str | int) -> int:
    """`5GB` -> 5_000_000_000, `200KiB` -> 204_800 (Hugging Face conventions); ints are bytes."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as 5GB")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"{value!r} is not a size such as 5GB, 500MB or 2GiB")
        number, unit = float(match.group(1)), match.group(2).upper()
    if not math.isfinite(number * _SIZE_UNITS[unit]):
        raise ValueError(f"{value[:20]!r}... is not a size such as 5GB, 500MB or 2GiB")
    size = int(number * _SIZE_UNITS[unit])
    if size < 1:
        raise ValueError(f"{value!r}: a shard size must be at least one byte")
    return size


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, like the shard sizes); below 1000, `512 B`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
