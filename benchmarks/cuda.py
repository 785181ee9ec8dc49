"""The merge math on a GPU (issue 20): bit-identical to the CPU's output, and how long it takes.

For a session lent a GPU machine (the `device` tool): one short run, everything in one command.
For each size (synthetic bf16 Llama-style checkpoints with a rank-16 LoRA on every linear layer,
benchmarks/synthetic.py), `mergekit-lite merge --no-verify` runs once per device in a fresh
process; the shards' SHA-256 of every device are compared with the first device's (the merge
writes the exact W + s B A rounded once, so any device must give the same bytes), and the wall
time and CPU time of each run are printed.

    .venv/bin/python benchmarks/cuda.py --sizes 0.3 6 20 --devices cpu cuda
    .venv/bin/python benchmarks/cuda.py --sizes 0.2 --devices cpu cpu      # the harness, on any machine

Exits 1 when some device's bytes differ from the first's. The checkpoints are built once under
--work and kept (20 GB needs 40 GB of disk with its output; the output is deleted after each run).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = """base: ./base
adapters: [./adapter]
dtype: bfloat16
tokenizer: none
device_map: {device}
output: ./merged-{device}
"""


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of each shard, by file name."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(2**24):
                h.update(chunk)
        out[path.name] = h.hexdigest()
    return out


def run(folder: Path, device: str) -> tuple[float, float, dict[str, str]]:
    """(wall s, CPU s, shard digests) of one merge on `device`, in a fresh process."""
    (folder / f"manifest-{device}.yaml").write_text(MANIFEST.format(device=device))
    out = folder / f"merged-{device}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", MERGEKIT_LITE_CACHE=str(folder / "cache"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mergekit_lite",
            "merge",
            "--quiet",
            "--no-verify",
            str(folder / f"manifest-{device}.yaml"),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    found = digests(out)
    shutil.rmtree(out, ignore_errors=True)
    return wall, cpu, found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.3, 6.0], help="checkpoint sizes in GB")
    parser.add_argument(
        "--devices", nargs="+", default=["cpu", "cuda"], help="device_map values, the first the reference"
    )
    parser.add_argument("--work", type=Path, default=HERE / "work", help="where the checkpoints are built")
    args = parser.parse_args()
    import torch  # after the arguments: --help needs no torch

    print(
        f"torch {torch.__version__}; CUDA {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}"
    )
    same = True
    for size in args.sizes:
        folder = args.work / f"llama-{size:g}GB"
        subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(folder), str(size)], check=True)
        gb = sum(p.stat().st_size for p in (folder / "base").glob("*.safetensors")) / 1e9
        reference = None
        for device in args.devices:
            wall, cpu, found = run(folder, device)
            reference = reference or found
            equal = found == reference
            same &= equal
            print(
                f"{gb:6.2f} GB  {device:>6}: wall {wall:6.1f} s  CPU {cpu:6.1f} s  {gb / wall:5.2f} GB/s  "
                f"shards {len(found)}  bytes {'identical to ' + args.devices[0] if equal else 'DIFFER'}",
                flush=True,
            )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
