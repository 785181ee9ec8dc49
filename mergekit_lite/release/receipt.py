"""The self-describing parts of a release besides its card: resolved manifest, receipt, checksums."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mergekit_lite._version import __version__
from mergekit_lite.io.digests import file_records
from mergekit_lite.io.format import DTYPE_NAMES
from mergekit_lite.plan.plan import Plan
from mergekit_lite.release.configs import write_json

LIBRARIES = ("torch", "transformers", "peft", "safetensors", "accelerate", "huggingface_hub", "numpy")


def versions() -> dict[str, str]:
    """The tool's and its libraries' versions."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"mergekit-lite": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan in a few numbers, for the receipt and the card."""
    return {
        "tensors": len(plan.tensors),
        "changed_tensors": sum(1 for t in plan.tensors if t.changed),
        "shards": plan.shard_names,
        "total_size": plan.total_bytes,
        "dtypes": sorted({DTYPE_NAMES.get(t.dtype, t.dtype) for t in plan.tensors}),
        "tie_word_embeddings": {"base": plan.tied_in, "release": plan.tied_out},
        "embedding_rows": plan.embedding_rows,
        "combine": plan.combine.summary() if plan.combine is not None else {"method": "sum"},
    }


def write_receipt(
    folder: Path,
    inputs: list[dict[str, Any]],
    plan: Plan,
    verification: dict[str, Any],
    *,
    known: dict[str, str] | None = None,
    sources: list[dict[str, str]] | None = None,
) -> dict[str, str]:
    """release.json: what was read and written, with SHA-256, and the versions that did it.

    `inputs` are file_records of the inputs; `known` maps release-relative paths to digests
    already computed (the shards'); `sources` records each hub input (manifest key, repo id,
    requested revision, resolved commit, snapshot folder). Returns every output's digest, for
    write_checksums.
    """
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("release.json", "SHA256SUMS"))
    outputs = file_records(paths, folder, known)
    write_json(
        folder / "release.json",
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["mergekit-lite", *sys.argv[1:]]) if sys.argv else "mergekit-lite",
            "versions": versions(),
            "plan": plan_summary(plan),
            "verification": {"passed": verification.get("passed"), "verified": verification.get("verified", True)},
            "sources": sources or [],
            "inputs": inputs,
            "outputs": outputs,
        },
    )
    return {r["path"]: r["sha256"] for r in outputs}


def write_checksums(folder: Path, known: dict[str, str] | None = None) -> None:
    """SHA256SUMS over every file of the release, checkable with `sha256sum -c SHA256SUMS`.

    `known` as for write_receipt: digests of files that need not be read again.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    lines = [f"{r['sha256']}  {r['path']}" for r in file_records(files, folder, known)]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n", encoding="utf-8")


def resolved_manifest(manifest: Any, base: Path, adapters: list[Path], output: Path) -> str:
    """The manifest as run, with every path made absolute (a hub source keeps its `id`, with the
    `revision` the caller pinned to the resolved commit)."""
    data = manifest.model_dump(mode="json", exclude_none=True)
    data["base"] = {"path": str(base)} if manifest.base.path is not None else data["base"]
    for entry, spec, path in zip(data["adapters"], manifest.adapters, adapters):
        if spec.path is not None:
            entry["path"] = str(path)
    data["output"]["path"] = str(output)
    header = f"# resolved by mergekit-lite {__version__}: the manifest this release was built from\n"
    return header + yaml.safe_dump(data, sort_keys=False)
