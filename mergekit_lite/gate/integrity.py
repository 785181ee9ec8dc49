"""Gate check 0, integrity: the release's files are the ones its SHA256SUMS and release.json describe.

Run by `verify` on a published release (a merge's own candidate has neither file yet: its
digests come from the gate's read-back of its shards), its checks listed first. Every file is read
once: the shards by the algebra checks, which hash them as they read them (io/readback.py), the
other files here, streamed in chunks (io/digests.sha256_file). Each file's SHA-256 and size are
compared with both records, so that a flipped bit, an edited card or receipt, a file added or
removed fails here, naming the file, whatever the other checks make of it.

A folder with none of SHA256SUMS, release.json and manifest.yaml was not published by mergekit-lite
(PEFT's merge_and_unload output, another tool's merge) named by `verify --against`: there is
nothing to check its files against, so the group is skipped, saying so, and the weights are judged by
the other checks alone. Any one of the three makes it a release, and then both records must match.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_lite.gate.report import GateReport
from mergekit_lite.io.digests import sha256_file

SUMS = "SHA256SUMS"
RECEIPT = "release.json"
MANIFEST = "manifest.yaml"


def check_integrity(
    report: GateReport, folder: Path, known: dict[str, str] | None = None, foreign: bool = False
) -> None:
    """Record `integrity: SHA256SUMS matches the files` and `integrity: release.json's outputs match`.

    `known` maps a file's path in the folder to its SHA-256 already computed from its bytes on disk
    (the shards', read back by the algebra checks); those files are not read again. `foreign`: the
    folder was named by `verify --against`, so it may be another tool's merge (skipped when it has
    none of the three files); the manifest's own output must always be a release."""
    if foreign and not any((folder / name).is_file() for name in (SUMS, RECEIPT, MANIFEST)):
        report.skipped["integrity"] = (
            f"`{folder.name}` is not a mergekit-lite release (no {SUMS}, {RECEIPT} or {MANIFEST}): "
            "nothing to check its files against; its weights are checked by the other groups"
        )
        return
    known = known or {}
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    listed, sums_problem = _read_sums(folder)
    recorded, receipt_problem = _read_receipt(folder)
    actual: dict[str, tuple[str, int]] = {}

    def measured(name: str) -> tuple[str, int] | None:
        if name not in actual:
            path = folder / name
            if not path.is_file():
                return None
            actual[name] = (known.get(name) or sha256_file(path), path.stat().st_size)
        return actual[name]

    problems: list[str] = [sums_problem] if sums_problem else []
    if listed is not None:
        for name, digest in listed.items():
            found = measured(name)
            if found is None:
                problems.append(f"`{name}` is listed but missing")
            elif found[0] != digest:
                problems.append(f"`{name}` does not match its SHA-256")
        problems += [f"`{n}` is not listed" for n in files if n != SUMS and n not in listed]
    report.add(
        "integrity",
        "SHA256SUMS matches the files",
        not problems,
        figure=len(problems),
        threshold=0,
        detail="; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else ""),
    )
    problems = [receipt_problem] if receipt_problem else []
    if recorded is not None:
        for name, (digest, size) in recorded.items():
            found = measured(name)
            if found is None:
                problems.append(f"`{name}` is recorded but missing")
            elif found[1] != size:
                problems.append(f"`{name}` is {found[1]} bytes, recorded {size}")
            elif found[0] != digest:
                problems.append(f"`{name}` does not match its recorded SHA-256")
        problems += [f"`{n}` is not recorded" for n in files if n not in (SUMS, RECEIPT) and n not in recorded]
    report.add(
        "integrity",
        "release.json's output digests and sizes match",
        not problems,
        figure=len(problems),
        threshold=0,
        detail="; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else ""),
    )


def _read_sums(folder: Path) -> tuple[dict[str, str] | None, str]:
    """SHA256SUMS as {path: digest} (sha256sum's text and binary forms), or None and why not."""
    path = folder / SUMS
    if not path.is_file():
        return None, f"no `{SUMS}`"
    listed: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if not sep or len(digest) != 64 or not name:
            return None, f"`{SUMS}` line {number} is not `<sha256>  <path>`"
        listed[name] = digest.lower()
    return listed, ""


def _read_receipt(folder: Path) -> tuple[dict[str, tuple[str, int]] | None, str]:
    """release.json's outputs as {path: (digest, size)}, or None and why not."""
    path = folder / RECEIPT
    if not path.is_file():
        return None, f"no `{RECEIPT}`"
    try:
        outputs = json.loads(path.read_text(encoding="utf-8"))["outputs"]
        return {o["path"]: (str(o["sha256"]).lower(), int(o["size"])) for o in outputs}, ""
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"`{RECEIPT}` has no readable `outputs` ({type(exc).__name__}: {exc})"
