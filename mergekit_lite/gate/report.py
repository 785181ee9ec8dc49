"""The gate's findings: one record per check with its figure and threshold, and their renderings."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mergekit_lite._version import __version__

GROUPS = ("integrity", "structure", "algebra", "end_to_end", "packaging", "eval", "runtimes")
SCHEMA = "mergekit-lite/verification/1"  # verification.json; bump on an incompatible change


@dataclass
class Check:
    """One check: what was measured, against what, and the first problem found."""

    group: str
    name: str
    passed: bool
    figure: Any = None
    threshold: Any = None
    detail: str = ""
    id: str = ""  # stable across runs and models: `group.slug`; see check_id

    def to_dict(self) -> dict[str, Any]:
        """The check for JSON: `figure` and `threshold` are numbers or null; a non-numeric one
        (a state such as "missing", a list, inf) is in `figure_text` / `threshold_text`."""
        figure, figure_text = _number(self.figure)
        threshold, threshold_text = _number(self.threshold)
        return {
            "id": self.id,
            "group": self.group,
            "name": self.name,
            "passed": self.passed,
            "figure": figure,
            "threshold": threshold,
            "figure_text": figure_text,
            "threshold_text": threshold_text,
            "detail": self.detail,
        }


def check_id(group: str, name: str) -> str:
    """A check's stable id from its group and name: lower case, counts dropped, so that
    "210 unchanged tensors equal the base" is `algebra.unchanged_tensors_equal_the_base` on
    every model. A check whose name says nothing stable passes its own id to `GateReport.add`."""
    words = re.sub(r"\s*\([^)]*\d[^)]*\)", " ", name)  # "(210 changed tensors)"
    words = re.sub(r"(?<![\w.])\d+(\.\d+)?(?![\w.])", " ", words)  # a count standing alone
    slug = re.sub(r"[^a-z0-9]+", "_", words.lower()).strip("_")
    return f"{group}.{slug}"


def _number(value: Any) -> tuple[float | int | None, str | None]:
    if isinstance(value, bool):
        return int(value), None
    if isinstance(value, int | float) and math.isfinite(value):
        return value, None
    if value is None or value == "":
        return None, None
    return None, value if isinstance(value, str) else json.dumps(value)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class GateReport:
    """Every check of one run of the gate, plus what was skipped and why."""

    dtype: str
    checks: list[Check] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per group, as run
    timestamp: str = field(default_factory=_now)  # when the gate started (UTC)
    # SHA-256 of the shard files by name, from the bytes the checks read back (not in verification.json)
    read_back: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def add(
        self,
        group: str,
        name: str,
        passed: bool,
        *,
        figure: Any = None,
        threshold: Any = None,
        detail: str = "",
        id: str | None = None,
    ) -> Check:
        """Record one check: `figure` measured against `threshold`, `detail` the first problem found.

        `id` (default: check_id of group and name) must be unique in the report: a duplicate is a bug.
        """
        check = Check(group, name, bool(passed), _plain(figure), _plain(threshold), detail, id or check_id(group, name))
        self.extend([check])
        return check

    def extend(self, checks: list[Check]) -> None:
        """Append checks made elsewhere (the algebra's, run in flight) as if they had been added here."""
        for check in checks:
            if any(c.id == check.id for c in self.checks):
                raise ValueError(f"two gate checks share the id `{check.id}`; pass `id=` to tell them apart")
            self.checks.append(check)

    def to_dict(self) -> dict[str, Any]:
        """verification.json: the verdict, every check by id, numeric figures, when and by what."""
        return {
            "schema": SCHEMA,
            "tool": {"name": "mergekit-lite", "version": __version__},
            "timestamp": self.timestamp,
            "verdict": "passed" if self.passed else "failed",
            "passed": self.passed,
            "failed": [c.id for c in self.failures],
            "dtype": self.dtype,
            "checks": [c.to_dict() for c in self.checks],
            "skipped": self.skipped,
            "timings": {group: round(seconds, 3) for group, seconds in self.timings.items()},
            "context": self.context,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def skipped_report(reason: str) -> dict[str, Any]:
    """verification.json for a release published without the gate."""
    return {
        "schema": SCHEMA,
        "tool": {"name": "mergekit-lite", "version": __version__},
        "timestamp": _now(),
        "verdict": "skipped",
        "passed": None,
        "verified": False,
        "failed": [],
        "checks": [],
        "skipped": {"all": reason},
    }


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def fmt(value: Any) -> str:
    """Figures as a person reads them."""
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    return "" if value is None else str(value)


def ordered(report: GateReport) -> list[Check]:
    """The checks failures first (in the order they ran), then the passing ones."""
    return report.failures + [c for c in report.checks if c.passed]


def verdict_line(report: GateReport, title: str) -> str:
    """The one line that heads the report wherever it is shown, the same for merge and verify."""
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.failures)} of {len(report.checks)} checks)"
    return f"{title}: verification {verdict}"


def table(report: GateReport, title: str = "release", note: str = "") -> str:
    """The report for the terminal: the verdict first (then `note`), failing checks first, aligned."""
    rows = [("", "check", "figure", "threshold", "detail")]
    for c in ordered(report):
        rows.append(("ok" if c.passed else "FAIL", f"{c.group}: {c.name}", fmt(c.figure), fmt(c.threshold), c.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [verdict_line(report, title), *([note] if note else [])]
    lines += ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + ("  " + r[4] if r[4] else "") for r in rows]
    for group, reason in report.skipped.items():
        lines.append(f"skip  {group}: {reason}")
    return "\n".join(lines)


def markdown(report: GateReport, title: str) -> str:
    """A Markdown summary (for the model card and $GITHUB_STEP_SUMMARY), failing checks first."""
    verdict = "passed" if report.passed else "**FAILED**"
    lines = [
        f"### {title}: verification {verdict}",
        "",
        "| | check | figure | threshold | detail |",
        "|---|---|---|---|---|",
    ]
    for c in ordered(report):
        mark = "✅" if c.passed else "❌"
        cells = [mark, f"{c.group}: {c.name}", fmt(c.figure), fmt(c.threshold), c.detail]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    for group, reason in report.skipped.items():
        lines.append(f"| ⏭ | {group} | skipped | | {reason.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"
