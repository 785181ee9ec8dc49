"""SHA-256 of the files a release is made from and made of, computed once.

Hashing costs about as much CPU as the merge itself (SHA-256 runs at about the speed of the
writes, on one core: docs/performance.md), so each file is hashed at most once per run and inputs
at most once per version of the file:

- the shards are hashed by the writer as their bytes go out (see writer.ShardWriter);
- inputs are hashed on a background thread while the merge runs (InputDigests), and remembered
  in a digest cache keyed by the file's identity (device, inode, size, mtime and ctime in
  nanoseconds), as git's index does: any write to a file changes its ctime, which no user call
  can set back, so a cached digest is only reused for the very same bytes. A nightly job merging
  new adapters into the same base hashes the base once.

The cache lives in $MERGEKIT_LITE_CACHE, else $XDG_CACHE_HOME/mergekit-lite, else
~/.cache/mergekit-lite; `MERGEKIT_LITE_CACHE=off` turns it off. It is one small JSON file,
digests.json (a JsonStore; checkpoint keeps its embedding names in another, architectures.json),
replaced atomically; a cache that cannot be read or written is ignored (it only saves time).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

CACHE_FILE = "digests.json"
CACHE_LIMIT = 20_000  # entries kept; the oldest go first


class Cancelled(Exception):
    """Hashing was abandoned because the run that wanted it is over."""


def sha256_file(path: Path, chunk: int = 8 * 2**20, stop: threading.Event | None = None) -> str:
    """Hex SHA-256 of a regular file, read in chunks into one reused buffer (hashed without the GIL).

    Anything else (a FIFO nobody writes would block the open for ever) is refused with an OSError:
    inputs are hashed on a background thread that may start before they have been checked.
    """
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO's open returns at once
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    os.set_blocking(fd, True)
    with open(fd, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            if stop is not None and stop.is_set():
                raise Cancelled(str(path))
            digest.update(view[:n])
    return digest.hexdigest()


def file_records(
    paths: list[Path],
    root: Path | None = None,
    known: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """[{path, size, sha256}] for files, paths relative to `root` when given.

    `known` maps a path (as recorded) to a digest already computed, for example by the shard
    writer as the bytes went out; those files are not read again. With `stop`, hashing gives up
    (raising Cancelled) once the event is set.
    """
    known = known or {}
    records = []
    for p in paths:
        name = str(p.relative_to(root)) if root else str(p)
        if stop is not None and stop.is_set():
            raise Cancelled(name)
        digest = known.get(name) or sha256_file(p, stop=stop)
        records.append({"path": name, "size": p.stat().st_size, "sha256": digest})
    return records


def cache_folder() -> Path | None:
    """Where the caches live (digests, checkpoint's embedding names), or None when MERGEKIT_LITE_CACHE=off."""
    configured = os.environ.get("MERGEKIT_LITE_CACHE")
    if configured:
        return None if configured.lower() == "off" else Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mergekit-lite"


def identity(path: Path) -> str:
    """A key that changes whenever the file's content can have changed."""
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


class JsonStore:
    """One small JSON object in the cache folder, `name`: read when made, written back by `save`.

    Saving merges what other runs wrote meanwhile, keeps the newest `limit` entries and replaces
    the file atomically. Entries that fail `valid`, and a file that cannot be read or written, are
    ignored: a cache only saves time. With no folder (the cache off) nothing is kept or written.
    """

    def __init__(self, folder: Path | None, name: str, limit: int, valid: Callable[[Any], bool]) -> None:
        self.file = folder / name if folder is not None else None
        self.limit = limit
        self._valid = valid
        self.entries: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        if self.file is None:
            return {}
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
            return {k: v for k, v in data.items() if isinstance(k, str) and self._valid(v)}
        except (OSError, ValueError, AttributeError, RecursionError):
            return {}

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        if self.file is not None:
            self.entries.pop(key, None)
            self.entries[key] = value  # most recent last

    def save(self) -> None:
        """Write the entries back, merged with the file's current ones; errors are ignored."""
        if self.file is None:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fresh = self._read()
            fresh.update(self.entries)
            keep = dict(list(fresh.items())[-self.limit :])
            fd, tmp = tempfile.mkstemp(prefix=f".{self.file.stem}.", dir=self.file.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(keep, fh)
            os.replace(tmp, self.file)
        except OSError:
            pass


class DigestCache:
    """Digests of input files by identity(): loaded at the start of a run, saved at its end."""

    def __init__(self, folder: Path | None) -> None:
        self.store = JsonStore(folder, CACHE_FILE, CACHE_LIMIT, lambda v: isinstance(v, str))

    def get(self, path: Path) -> str | None:
        """The cached digest of `path`, if its identity is unchanged."""
        return self.store.get(identity(path)) if self.store.file is not None else None

    def put(self, path: Path, digest: str, before: str) -> None:
        """Remember `digest` for `path` if its identity is still `before` (it did not change while hashed)."""
        if self.store.file is not None and identity(path) == before:
            self.store.put(before, digest)

    def save(self) -> None:
        """Write the cache back atomically, merged with what other runs wrote meanwhile; errors are ignored."""
        self.store.save()


def input_records(paths: list[Path], cache: DigestCache, stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """file_records of the inputs, each marked `digest: cached` or `computed`, the cache updated."""
    records = []
    for p in paths:
        before = identity(p)
        digest = cache.get(p)
        how = "cached"
        if digest is None:
            digest, how = sha256_file(p, stop=stop), "computed"
            cache.put(p, digest, before)
        records.append({"path": str(p), "size": p.stat().st_size, "sha256": digest, "digest": how})
    return records


class InputDigests:
    """The inputs' records (input_records), computed on a background thread while the run goes on.

    Started first, hashing overlaps the rest instead of following it: a merge starts it with the
    base's weight files as soon as their names are known (before transformers is imported to
    name the embeddings, seconds that the hashing then fills), and `add`s the other inputs once the
    plan is made. `close` stops the thread early when the run fails; `result` saves what was
    hashed to the cache when it succeeded.
    """

    def __init__(self, paths: list[Path]) -> None:
        self._stop = threading.Event()
        self._cache = DigestCache(cache_folder())
        self._pool = ThreadPoolExecutor(1, "mergekit-hash")
        self._paths: list[Path] = []
        self._futures: list[Future[list[dict[str, Any]]]] = []
        self.add(paths)

    def add(self, paths: list[Path]) -> None:
        """Hash these too, after those given before (a path given before is not hashed again)."""
        fresh = [p for p in paths if p not in self._paths]
        self._paths += fresh
        if fresh:
            self._futures.append(self._pool.submit(input_records, fresh, self._cache, self._stop))

    def result(self) -> list[dict[str, Any]]:
        """The records, in the order the paths were given, once every input has been hashed."""
        records = [r for future in self._futures for r in future.result()]
        self._cache.save()
        return records

    def close(self) -> None:
        """Stop hashing (if still running) and wait for the thread."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> InputDigests:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
