"""Atomic publishing: the lock, recovery of an interrupted publish, stale staging."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergekit_lite.errors import OutputError
from mergekit_lite.release.publish import output_lock, publish, staging


def test_interrupted_publish_is_recovered(tmp_path: Path) -> None:
    # a run killed between `rename(output, old)` and `rename(stage, output)`
    old = tmp_path / ".release.1a2b3c4d.old"
    old.mkdir()
    (old / "model.safetensors").write_text("previous release")
    stale = tmp_path / ".release.99999999.staging"
    stale.mkdir()
    (stale / "half").write_text("partial")
    with output_lock(tmp_path / "release"):
        assert (tmp_path / "release" / "model.safetensors").read_text() == "previous release"
        assert not old.exists() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_stale_old_is_dropped_when_the_new_release_is_in_place(tmp_path: Path) -> None:
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "new").write_text("new")
    (tmp_path / ".release.deadbeef.old").mkdir()
    with output_lock(tmp_path / "release"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
    assert (tmp_path / "release" / "new").read_text() == "new"


def test_lock_refuses_a_second_holder_and_names_the_pid(tmp_path: Path) -> None:
    with output_lock(tmp_path / "release"):
        pid = (tmp_path / ".release.lock").read_text().strip()
        assert pid == str(os.getpid())
        # flock locks belong to the open file description: a second open in this process conflicts too
        with pytest.raises(OutputError, match=rf"being written by another run \(pid {pid}\)"):
            with output_lock(tmp_path / "release"):
                pass
    assert not (tmp_path / ".release.lock").exists()


def test_overwrite_swaps_whole_folders(tmp_path: Path) -> None:
    out = tmp_path / "release"
    out.mkdir()
    (out / "old-only").write_text("old")
    (out / "release.json").write_text('{"outputs": []}')  # an earlier release: replaced only such a folder
    with staging(out) as stage:
        (stage / "new-only").write_text("new")
        publish(stage, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["new-only"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_failed_staging_is_removed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with staging(tmp_path / "release") as stage:
            (stage / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
