"""The SHA-256 floor of a merge: every weight file of a checkpoint hashed twice (as a merge hashes its
inputs for the receipt and its output for SHA256SUMS), the two streams on threads of their own, the
files read from the page cache. For benchmarks/speed.py, which times it as one of its rows.

    .venv/bin/python benchmarks/sha256_bound.py BASE_FOLDER MARKER_FOLDER   # creates MARKER_FOLDER
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    digest, buffer = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def stream(files: list[Path]) -> list[str]:
    return [sha256_file(p) for p in files]


def main() -> None:
    base, marker = Path(sys.argv[1]), Path(sys.argv[2])
    files = sorted(base.glob("*.safetensors"))
    with ThreadPoolExecutor(2) as pool:  # inputs and output: two streams, as in a merge
        first, second = pool.map(stream, [files, files])
    assert first == second
    marker.mkdir()
    (marker / "SHA256SUMS").write_text("".join(f"{d}  {p.name}\n" for d, p in zip(first, files, strict=True)))
    print(f"{sum(p.stat().st_size for p in files) * 2 / 1e9:.2f} GB hashed on {min(2, os.cpu_count() or 1)} cores")


if __name__ == "__main__":
    main()
