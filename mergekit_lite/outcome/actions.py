"""GitHub Actions: `::error::` annotations, `$GITHUB_OUTPUT` entries and the `$GITHUB_STEP_SUMMARY`.

All three are written from the command's `Outcome`:
- the annotations only under Actions (`GITHUB_ACTIONS=true`): one per failed check (its stable id
  in the title) or one for the error that ended the command;
- the outputs and the summary whenever their files are named (Actions names them for every step):
  `verdict`, `exit-code`, `release`, `digest`, `rejected`, `report`; and, for merge, verify and
  plan, a Markdown summary whose first line is the verdict, for every outcome, input errors included.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from mergekit_lite.gate.report import fmt, markdown
from mergekit_lite.outcome.document import VERDICTS, Outcome

SUMMARISED = ("merge", "verify", "plan")  # the commands a step summary is written for

# the verdict's mark and headline in the summary
HEADLINES = {
    "published": ("✅", "published"),
    "unverified": ("⚠️", "published NOT VERIFIED (gate skipped)"),
    "passed": ("✅", "verification passed"),
    "planned": ("📝", "planned (nothing written)"),
    "ok": ("✅", "done"),
    "rejected": ("❌", "REJECTED by the gate; nothing published"),
    "failed": ("❌", "FAILED; nothing published"),
    "input_error": ("⛔", "INPUT ERROR; nothing written"),
    "busy": ("⏳", "BUSY: another run holds the output; nothing written; retry"),
    "interrupted": ("⛔", "INTERRUPTED; nothing published"),
    "terminated": ("⛔", "TERMINATED (SIGTERM); nothing published"),
}


def under_actions(env: Mapping[str, str]) -> bool:
    return env.get("GITHUB_ACTIONS") == "true"


def annotations(outcome: Outcome) -> list[str]:
    """The `::error::` lines for a failed outcome: one per failed check, else the error itself."""
    title = f"mergekit-lite {outcome.command}"
    lines = []
    if outcome.report is not None:
        for c in outcome.report.failures:
            message = f"{c.group}: {c.name} = {fmt(c.figure)} (threshold {fmt(c.threshold)})"
            message += f"; {c.detail}" if c.detail else ""
            lines.append(_command("error", f"{title}: {c.id}", message))
    if outcome.error and (outcome.verdict != "rejected" or not lines):
        lines.append(_command("error", title, outcome.error))
    return lines


def _command(kind: str, title: str, message: str) -> str:
    """A workflow command, escaped as the runner expects (docs: workflow commands, toolkit's escaping)."""

    def data(text: str) -> str:
        return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    def prop(text: str) -> str:
        return data(text).replace(":", "%3A").replace(",", "%2C")

    return f"::{kind} title={prop(title)}::{data(message)}"


def outputs(outcome: Outcome) -> dict[str, str]:
    """The step's outputs (`steps.<id>.outputs.<name>`); empty strings for what does not apply."""
    report = ""
    if outcome.verdict in ("published", "unverified") and outcome.release is not None:
        report = str(outcome.release / "verification.json")
    elif outcome.rejected is not None:
        report = str(outcome.rejected / "verification.json")
    return {
        "verdict": outcome.verdict,
        "exit-code": str(outcome.exit_code),
        "release": str(outcome.release) if outcome.release is not None and outcome.digest else "",
        "digest": outcome.digest or "",
        "rejected": str(outcome.rejected) if outcome.rejected is not None else "",
        "report": report,
    }


def append_outputs(path: Path, values: dict[str, str]) -> None:
    """Append `name=value` lines (a heredoc block for a value with a newline) to $GITHUB_OUTPUT."""
    with open(path, "a", encoding="utf-8") as fh:
        for name, value in values.items():
            if "\n" in value or "\r" in value:
                delimiter = f"ghadelimiter_{secrets.token_hex(8)}"
                fh.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
            else:
                fh.write(f"{name}={value}\n")


def summary(outcome: Outcome) -> str:
    """The step summary: the verdict first, then the failing checks, the table, paths and timings."""
    mark, headline = HEADLINES[outcome.verdict]
    name = outcome.release.name if outcome.release is not None else "release"
    which = f" `{outcome.release.name}`" if outcome.release is not None else ""
    lines = [f"## {mark} mergekit-lite {outcome.command}{which}: {headline}", ""]
    if outcome.error:
        lines += [f"> {outcome.error}", ""]
    if outcome.verdict == "unverified":
        lines += [
            f"The gate did not run ({outcome.skipped_because or 'skipped'}): the release is marked NOT VERIFIED.",
            "",
        ]
    if outcome.report is not None:
        lines += [markdown(outcome.report, name)]
    facts = [("exit code", f"{outcome.exit_code} ({VERDICTS[outcome.verdict][1]})")]
    if outcome.digest:
        facts += [("release", f"`{outcome.release}`"), ("digest", f"`{outcome.digest}`")]
    if outcome.rejected is not None:
        facts.append(("rejected candidate", f"`{outcome.rejected}`"))
    if outcome.timings:
        facts.append(("timings", ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items())))
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts)]
    return "\n".join(lines) + "\n"


def report_to_actions(outcome: Outcome, env: Mapping[str, str], stream: TextIO) -> None:
    """Everything Actions gets from one outcome: annotations on `stream`, outputs, the summary."""
    if under_actions(env) and outcome.exit_code != 0:
        for line in annotations(outcome):
            print(line, file=stream, flush=True)
    if env.get("GITHUB_OUTPUT"):
        append_outputs(Path(env["GITHUB_OUTPUT"]), outputs(outcome))
    if env.get("GITHUB_STEP_SUMMARY") and outcome.command in SUMMARISED:
        with open(env["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as fh:
            fh.write(summary(outcome) + "\n")
