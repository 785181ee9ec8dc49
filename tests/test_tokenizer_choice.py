"""Issue 22, the tokenizer at plan time: a missing tokenizer folder fails at `plan`, before any
merge; a release without a tokenizer is published only with an explicit `tokenizer: none`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_lite.cli import main

from helpers import write_manifest


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("command", ["plan", "merge"])
def test_missing_tokenizer_folder_fails_at_plan(tmp_path: Path, zoo, command: str) -> None:
    m = write_manifest(
        tmp_path, zoo.base("llama"), [zoo.adapter("llama_lora")], "float32", tokenizer="./no-such-tokenizer"
    )
    line = one_error(run(command, str(m)))
    assert line == f"error: `tokenizer: ./no-such-tokenizer`: no tokenizer files in `{tmp_path / 'no-such-tokenizer'}`"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"], "something was written"


@pytest.mark.parametrize("command", ["plan", "merge"])
def test_no_tokenizer_anywhere_needs_tokenizer_none(tmp_path: Path, zoo, command: str) -> None:
    m = write_manifest(tmp_path, zoo.base("llama"), [zoo.adapter("llama_lora")], "float32", tokenizer="adapter")
    line = one_error(run(command, str(m)))
    assert line.startswith("error: `tokenizer: adapter`: neither the adapters nor the base ship a tokenizer;")
    assert "set `tokenizer: none` to publish a release without a tokenizer" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"]


def test_tokenizer_none_publishes_without_one_and_says_so(tmp_path: Path, zoo) -> None:
    m = write_manifest(tmp_path, zoo.base("llama"), [zoo.adapter("llama_lora")], "float32", tokenizer="none")
    result = run("merge", "-q", str(m))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] is True
    assert report["skipped"]["packaging"] == "the release ships no tokenizer (`tokenizer: none`)"
