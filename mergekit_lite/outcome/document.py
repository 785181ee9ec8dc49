"""What one command did, as plain data: the verdict, the exit code, paths, digest, gate and timings.

Every command builds one `Outcome`; `--json` prints `to_dict()` as the only thing on stdout, and
the GitHub Actions outputs and step summary (actions.py) are written from it, so that the three
can never disagree. The verdicts are the VERDICTS table (docs/ci.md lists them).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_lite._version import __version__
from mergekit_lite.gate.report import GateReport

FORMAT = "mergekit-lite/outcome/1"  # the --json document; bump on an incompatible change

# verdict -> (exit code, what it means); a command ends in exactly one of these
VERDICTS: dict[str, tuple[int, str]] = {
    "published": (0, "the release passed the gate and is at `release`"),
    "unverified": (0, "the release is at `release`, published with the gate skipped (marked NOT VERIFIED)"),
    "passed": (0, "verify: the release at `release` passed the gate"),
    "planned": (0, "plan: what a merge would do; nothing written"),
    "ok": (0, "diff, schema, example: done"),
    "rejected": (1, "the gate failed; nothing published (`rejected` names a kept candidate)"),
    "failed": (1, "the merge or the write failed; nothing published"),
    "input_error": (2, "invalid input (manifest, checkpoint, adapter, output location); nothing written"),
    "busy": (75, "another run holds the output's lock; nothing written; retry later"),
    "interrupted": (130, "interrupted (Ctrl-C); nothing published"),
    "terminated": (143, "terminated (SIGTERM, a cancelled CI job); nothing published"),
}
_BY_EXIT_CODE = {2: "input_error", 75: "busy", 130: "interrupted", 143: "terminated"}


@dataclass
class Outcome:
    """One command's result; filled in as the command goes, so that a failure still says what was known."""

    command: str
    verdict: str = "ok"
    error: str | None = None  # the one line an error printed
    release: Path | None = None  # the published (or verified) release, or where it would go
    rejected: Path | None = None  # a rejected candidate kept by --keep-rejected
    report: GateReport | None = None
    skipped_because: str | None = None  # why the gate did not run, for an unverified release
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    data: dict[str, Any] = field(default_factory=dict)  # the command's own fields (plan, rows, ...)

    @property
    def exit_code(self) -> int:
        return VERDICTS[self.verdict][0]

    def fail(self, message: str, exit_code: int) -> None:
        """Record an error that ended the command (its exit code picks the verdict)."""
        self.error = " ".join(message.split())
        if self.report is not None and not self.report.passed:
            self.verdict = "rejected"
        else:
            self.verdict = _BY_EXIT_CODE.get(exit_code, "failed")

    @property
    def digest(self) -> str | None:
        """The release's digest: SHA-256 of its SHA256SUMS, which lists every other file's SHA-256."""
        return release_digest(self.release) if self.verdict in ("published", "unverified", "passed") else None

    def to_dict(self) -> dict[str, Any]:
        """The --json document: fixed keys first, then the command's own."""
        gate = self.report.to_dict() if self.report is not None else None
        return _finite(
            {
                "format": FORMAT,
                "tool": {"name": "mergekit-lite", "version": __version__},
                "command": self.command,
                "verdict": self.verdict,
                "exit_code": self.exit_code,
                "error": self.error,
                "release": str(self.release) if self.release is not None else None,
                "rejected": str(self.rejected) if self.rejected is not None else None,
                "digest": self.digest,
                "gate": gate,
                "skipped_because": self.skipped_because,
                "timings": {stage: round(seconds, 3) for stage, seconds in self.timings.items()},
                **self.data,
            }
        )


def _finite(value: Any) -> Any:
    """The document with every non-finite float as its name ("inf", "nan"): strict JSON has none."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def release_digest(folder: Path | None) -> str | None:
    """`sha256:<hex>` of `folder/SHA256SUMS`, or None when there is none."""
    sums = folder / "SHA256SUMS" if folder is not None else None
    if sums is None or not sums.is_file():
        return None
    return "sha256:" + hashlib.sha256(sums.read_bytes()).hexdigest()
