"""Atomic output: a staging folder beside the output, fsync'd, renamed into place at the end."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergekit_lite.errors import OutputBusy, OutputError
from mergekit_lite.sizes import human_bytes

RECEIPT = "release.json"


def is_release(folder: Path) -> bool:
    """Whether `folder` holds a mergekit-lite release: its release.json, a JSON object with `outputs`."""
    try:
        doc = json.loads((folder / RECEIPT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("outputs"), list)


def check_output(output: Path, inputs: list[Path], overwrite: bool, needed_bytes: int, force: bool = False) -> None:
    """Refuse an output that exists (unless `overwrite` and it is a release, or `force`), overlaps an
    input, or does not fit on its disk; write nothing."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"output `{output}` exists and is not a folder")
    for inp in inputs:
        if output == inp or output.is_relative_to(inp) or inp.is_relative_to(output):
            raise OutputError(f"output `{output}` overlaps input `{inp}`; choose a folder outside the inputs")
    if output.is_dir() and any(output.iterdir()):
        if not (overwrite or force):
            raise OutputError(f"output `{output}` exists and is not empty; set `output.overwrite: true` to replace it")
        if not force and not is_release(output):
            raise OutputError(
                f"output `{output}` exists and is not a mergekit-lite release (no {RECEIPT}); refusing to replace "
                "it: choose another output, or pass --force to replace it anyway"
            )
    anchor = output.parent  # the staging folder, the lock and any missing parents are made here
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputError(f"output `{output}`: `{anchor}` is a file, not a folder; choose another output path")
    if not os.access(anchor, os.W_OK | os.X_OK):  # a read-only file system fails this even for root
        why = "a read-only file system" if os.statvfs(anchor).f_flag & os.ST_RDONLY else "not writable by this user"
        raise OutputError(f"output `{output}`: cannot write in `{anchor}` ({why}); choose a writable output location")
    free = shutil.disk_usage(anchor).free
    if free < needed_bytes:
        raise OutputError(
            f"output `{output}` needs {human_bytes(needed_bytes)} but its disk has {human_bytes(free)} free"
        )


def describe_output(output: Path, needed_bytes: int) -> dict[str, Any]:
    """What publishing at `output` would do (for `plan`): the path, whether it exists, what it holds and
    would be replaced, the disk the release needs beside it (the old one goes only after the swap)."""
    exists = output.is_dir()
    files = [p for p in output.rglob("*") if p.is_file()] if exists else []
    kind = "absent" if not exists else ("empty" if not any(output.iterdir()) else "other")
    replaces = None
    if kind == "other":
        kind = "release" if is_release(output) else kind
        replaces = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
        if kind == "release":
            try:
                doc = json.loads((output / RECEIPT).read_text(encoding="utf-8"))
                replaces["created"] = doc.get("created")
                replaces["version"] = (doc.get("versions") or {}).get("mergekit-lite")
            except (OSError, ValueError, AttributeError):
                pass
    anchor = output.parent
    while not anchor.exists():
        anchor = anchor.parent
    return {
        "path": str(output),
        "exists": exists,
        "holds": kind,
        "replaces": replaces,
        "needed_bytes": needed_bytes,
        "free_bytes": shutil.disk_usage(anchor).free,
    }


def output_lines(info: dict[str, Any]) -> list[str]:
    """describe_output's findings as the lines `plan` prints."""
    held = {
        "absent": "does not exist yet: it will be created",
        "empty": "exists, empty: the release goes there",
        "release": "exists, a mergekit-lite release: it will be replaced once the new one passes the gate",
        "other": "exists, NOT a mergekit-lite release: it will be replaced (--force)",
    }[info["holds"]]
    lines = [f"path      {info['path']}", f"          {held}"]
    if info["replaces"] is not None:
        old = info["replaces"]
        made = f", made {old['created']} by mergekit-lite {old['version']}" if old.get("created") else ""
        lines.append(f"replaces  {old['files']} files, {human_bytes(old['bytes'])}{made}")
    lines.append(
        f"disk      needs {human_bytes(info['needed_bytes'])} beside it, {human_bytes(info['free_bytes'])} free"
    )
    return lines


@contextmanager
def new_parents(output: Path) -> Iterator[None]:
    """Create the output's missing parent folders; remove them again if the run fails."""
    made = []
    parent = output.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    for folder in reversed(made):
        folder.mkdir()
    try:
        yield
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextmanager
def staging(output: Path) -> Iterator[Path]:
    """A fresh staging folder beside `output`, removed unless it was published or kept."""
    stage = output.parent / f".{output.name}.{secrets.token_hex(4)}.staging"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def keep_rejected(stage: Path, output: Path) -> Path:
    """Move a candidate that failed the gate to `<output>.rejected` (replacing an older one)."""
    target = output.parent / f"{output.name}.rejected"
    if target.exists():
        shutil.rmtree(target)
    os.rename(stage, target)
    stage.mkdir()  # the staging context removes this empty stand-in
    return target


def publish(stage: Path, output: Path, overwrite: bool, force: bool = False) -> None:
    """fsync the staged files and rename the folder into place, replacing an old release only now
    (anything else only with `force`)."""
    for path in stage.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(stage)
    old = None
    if output.exists():
        if any(output.iterdir()) and not (force or (overwrite and is_release(output))):
            raise OutputError(f"output `{output}` appeared while merging; not replacing it")
        if _exchange(stage, output):  # one atomic step: the output path always holds a whole release
            fsync_path(output.parent)
            shutil.rmtree(stage, ignore_errors=True)  # the previous release, now under the staging name
            return
        old = output.parent / f".{output.name}.{secrets.token_hex(4)}.old"
        os.rename(output, old)
    try:
        os.rename(stage, output)
    except BaseException:
        if old is not None:
            os.rename(old, output)
        raise
    fsync_path(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable.

    Without it, replacing a release takes two renames, and a crash between them leaves nothing at
    the output path until the next run's `recover_stale` puts the previous release back.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, some musl builds)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the kernel or file system cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entries: names created or renamed in it) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside the output for the whole run; a second run fails fast.

    The kernel's flock is released when a process dies, so a lock file left by a killed run
    does not block the next one; the pid written inside names the holder in the error.
    """
    path = output.parent / f".{output.name}.lock"
    fd = _acquire(path, output)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        recover_stale(output)
        try:
            yield
        finally:
            os.unlink(path)
    finally:
        os.close(fd)


def _acquire(path: Path, output: Path) -> int:
    """Open and flock the lock file; retry if a finishing run unlinked it under us."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise _busy(output, holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def check_unlocked(output: Path) -> None:
    """Refuse now, before any plan is printed or byte written, when another run holds the output's lock.

    Opens the lock file only if it exists (creates nothing) and tests it with a shared flock, which
    fails while a run holds it exclusively. The run still takes the lock itself later (output_lock).
    """
    import fcntl

    try:
        fd = os.open(output.parent / f".{output.name}.lock", os.O_RDONLY)
    except OSError:  # no lock file (or no parent folder yet): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(output, os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown") from None
    finally:
        os.close(fd)  # closing releases the shared lock


def _busy(output: Path, holder: str) -> OutputBusy:
    return OutputBusy(f"output `{output}` is being written by another run (pid {holder}); wait for it")


def recover_stale(output: Path) -> None:
    """Clean what a killed run left beside `output` (called while holding its lock).

    A run killed between the two renames of publish leaves the previous release as `.old`
    and nothing at the output: put the previous release back. Staging folders are removed.
    """
    olds = sorted(output.parent.glob(f".{output.name}.*.old"))
    if olds and not output.exists():
        os.rename(olds[-1], output)
        olds = olds[:-1]
    for leftover in [*olds, *output.parent.glob(f".{output.name}.*.staging")]:
        shutil.rmtree(leftover, ignore_errors=True)
