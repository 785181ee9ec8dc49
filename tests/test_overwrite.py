"""Issue 22, safe overwrite: `overwrite: true` replaces an earlier mergekit-lite release (its
release.json) and nothing else unless `--force`; `plan` says where the release goes, whether the
path exists, what would be replaced and the disk it needs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.release.publish import is_release

from helpers import write_manifest


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its SHA-256: what 'nothing touched' is compared by."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def manifest(tmp_path: Path, zoo) -> Path:
    m = write_manifest(tmp_path, zoo.base("llama"), [(zoo.adapter("llama_lora"), None)], "float32", overwrite=True)
    return m


def test_non_release_folder_is_refused_with_nothing_touched(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "foo").write_text("unrelated")
    before = tree(tmp_path)
    for command in ("merge", "plan"):
        result = run(command, str(manifest))
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert lines == [
            f"error: output `{out}` exists and is not a mergekit-lite release (no release.json); refusing to "
            "replace it: choose another output, or pass --force to replace it anyway"
        ], result.stderr
        assert tree(tmp_path) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml", "out"]


def test_force_replaces_a_non_release_folder(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "foo").write_text("unrelated")
    plan = run("plan", str(manifest), "--force")
    assert plan.exit_code == 0, plan.output
    assert (
        f"path      {out}\n          exists, NOT a mergekit-lite release: it will be replaced (--force)" in plan.stdout
    )
    assert "replaces  1 files, 9 B\n" in plan.stdout
    result = run("merge", "-q", "--no-verify", "--force", str(manifest))
    assert result.exit_code == 0, result.output
    assert not (out / "foo").exists() and is_release(out)


def test_an_earlier_release_is_replaced_and_plan_says_so(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    absent = run("plan", str(manifest), "--json")
    assert absent.exit_code == 0, absent.output
    info = json.loads(absent.stdout)["output"]
    assert info["path"] == str(out) and info["exists"] is False and info["holds"] == "absent"
    assert info["replaces"] is None and info["needed_bytes"] > 0 and info["free_bytes"] > info["needed_bytes"]
    assert run("merge", "-q", "--no-verify", str(manifest)).exit_code == 0
    first = json.loads((out / "release.json").read_text())["created"]
    text = run("plan", str(manifest))
    assert text.exit_code == 0, text.output
    files = sum(1 for p in out.rglob("*") if p.is_file())
    assert "exists, a mergekit-lite release: it will be replaced once the new one passes the gate" in text.stdout
    assert f"replaces  {files} files, " in text.stdout and f", made {first} by mergekit-lite " in text.stdout
    assert "disk      needs " in text.stdout
    info = json.loads(run("plan", str(manifest), "--json").stdout)["output"]
    assert info["holds"] == "release" and info["replaces"]["files"] == files and info["replaces"]["created"] == first
    (out / "marker-of-the-old-release").write_text("x")  # not a release file: gone once replaced
    result = run("merge", "-q", "--no-verify", str(manifest))
    assert result.exit_code == 0, result.output
    assert not (out / "marker-of-the-old-release").exists() and is_release(out)


def test_a_folder_with_a_fake_release_json_is_not_a_release(tmp_path: Path) -> None:
    (tmp_path / "release.json").write_text("[]")
    assert not is_release(tmp_path)
    (tmp_path / "release.json").write_text('{"outputs": []}')
    assert is_release(tmp_path)
