"""The gate's findings: one record per check with its figure and threshold, and their renderings."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

GROUPS = ("integrity", "structure", "algebra", "end_to_end", "packaging")


@dataclass
class Check:
    """One check: what was measured, against what, and the first problem found."""

    group: str
    name: str
    passed: bool
    figure: Any = None
    threshold: Any = None
    detail: str = ""


@dataclass
class GateReport:
    """Every check of one run of the gate, plus what was skipped and why."""

    dtype: str
    checks: list[Check] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def add(
        self, group: str, name: str, passed: bool, *, figure: Any = None, threshold: Any = None, detail: str = ""
    ) -> Check:
        """Record one check: `figure` measured against `threshold`, `detail` the first problem found."""
        check = Check(group, name, bool(passed), _plain(figure), _plain(threshold), detail)
        self.checks.append(check)
        return check

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "dtype": self.dtype,
            "checks": [asdict(c) for c in self.checks],
            "skipped": self.skipped,
            "context": self.context,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def skipped_report(reason: str) -> dict[str, Any]:
    """verification.json for a release published without the gate."""
    return {"passed": None, "verified": False, "skipped": {"all": reason}, "checks": []}


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


def table(report: GateReport) -> str:
    """The report as an aligned text table for the terminal."""
    rows = [("", "check", "figure", "threshold", "detail")]
    for c in report.checks:
        rows.append(("ok" if c.passed else "FAIL", f"{c.group}: {c.name}", fmt(c.figure), fmt(c.threshold), c.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + ("  " + r[4] if r[4] else "") for r in rows]
    for group, reason in report.skipped.items():
        lines.append(f"skip  {group}: {reason}")
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.failures)} of {len(report.checks)} checks)"
    lines.append(f"verification {verdict}")
    return "\n".join(lines)


def markdown(report: GateReport, title: str) -> str:
    """A Markdown summary (for the model card and $GITHUB_STEP_SUMMARY)."""
    verdict = "passed" if report.passed else "**FAILED**"
    lines = [
        f"### {title}: verification {verdict}",
        "",
        "| | check | figure | threshold | detail |",
        "|---|---|---|---|---|",
    ]
    for c in report.checks:
        mark = "✅" if c.passed else "❌"
        cells = [mark, f"{c.group}: {c.name}", fmt(c.figure), fmt(c.threshold), c.detail]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    for group, reason in report.skipped.items():
        lines.append(f"| ⏭ | {group} | skipped | | {reason.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"
