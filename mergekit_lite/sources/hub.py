"""Hub sources: a repository `id` and `revision` resolved to a local snapshot folder.

The only module that imports huggingface_hub, and only for a manifest with hub sources (a merge
of local folders does not pay for its import). pipeline.prepare calls `resolve_hub_sources` once;
every later stage sees plain local folders. Only the files a merge reads are fetched: configs,
tokenizer files and chat templates, then the weight files (for a sharded base, exactly the shards
its index names, so that a repository that also ships e.g. `consolidated.safetensors` does not
cost a second copy). `HF_HUB_OFFLINE` and the cache location are read when this runs, not when
huggingface_hub was imported.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_lite.errors import InputError, ManifestError
from mergekit_lite.manifest.load import HubPin, LoadedManifest

if TYPE_CHECKING:
    from huggingface_hub.errors import LocalEntryNotFoundError

log = logging.getLogger(__name__)

DEFAULT_REVISION = "main"
COMMIT = re.compile(r"[0-9a-f]{40}")
INDEX = "model.safetensors.index.json"
# configs (config.json, generation_config.json, the index, adapter_config.json), tokenizer files, chat templates
METADATA = ["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt", "additional_chat_templates/*"]
ADAPTER_WEIGHTS = ["adapter_model.safetensors"]
ADAPTER_PICKLE = ["adapter_model.bin"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def resolve_hub_sources(loaded: LoadedManifest) -> LoadedManifest:
    """`loaded` with every `id` source resolved to a snapshot folder and pinned to its commit.

    A manifest without hub sources is returned as is, and huggingface_hub is not called.
    """
    m = loaded.manifest
    wanted = [
        ("base", ("base", "id"), m.base, False),
        *((f"adapters[{i}]", ("adapters", i, "id"), a, a.allow_pickle) for i, a in enumerate(m.adapters)),
    ]
    wanted = [w for w in wanted if w[2].id is not None]
    if not wanted:
        return loaded
    cache = cache_folder(loaded.resolve(m.cache_dir) if m.cache_dir is not None else None)
    pins = [
        fetch(where, spec.id, spec.revision, cache=cache, label=f"{loaded.at(*loc)}: `{where}.id`", allow_pickle=pickle)
        for where, loc, spec, pickle in wanted
    ]
    return loaded.with_pins(pins)


def fetch(
    where: str, repo_id: str, revision: str | None, *, cache: Path, label: str, allow_pickle: bool = False
) -> HubPin:
    """Resolve one repository at one revision to its snapshot folder, fetching what a merge reads.

    `where` is the manifest key (`base` or `adapters[i]`), `label` how errors name it. `revision`
    None means `main`, resolved to a commit and recorded, with a warning that the release is not
    reproducible from the manifest as written. Raises an InputError naming the id and revision
    when the snapshot cannot be had.
    """
    requested = revision or DEFAULT_REVISION
    offline = is_offline()
    folder = _snapshot(repo_id, requested, cache, METADATA, offline=offline, label=label)
    commit = folder.name
    if not COMMIT.fullmatch(commit):
        raise InputError(
            f"{label} `{repo_id}` revision `{requested}` resolved to the folder `{folder}`, which is not "
            "named by a commit hash; the cache looks damaged: download the snapshot again"
        )
    weights = _base_weights(folder) if where == "base" else ADAPTER_WEIGHTS + (ADAPTER_PICKLE if allow_pickle else [])
    folder = _snapshot(
        repo_id, commit, cache, weights, offline=offline, label=label
    )  # by commit: a moving branch cannot mix two
    if revision is None:
        log.warning(
            "%s `%s` gives no `revision`: using `%s`, which is commit %s now; pin `revision: %s` "
            "for a reproducible release",
            label,
            repo_id,
            DEFAULT_REVISION,
            commit,
            commit,
        )
    storage = _storage(cache, repo_id).resolve()
    return HubPin(where, repo_id, requested, commit, folder.resolve(), storage)


def cache_folder(explicit: Path | None = None) -> Path:
    """The hub cache to use: `explicit` (the manifest's `cache_dir`), else HF_HUB_CACHE, else
    HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub, as huggingface_hub
    orders them, but read from the environment now rather than when huggingface_hub was imported."""
    if explicit is not None:
        return explicit
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(os.path.expanduser(env[name])))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def is_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def _base_weights(folder: Path) -> list[str]:
    """The base's weight files: the shards its index names, else every safetensors file.

    A malformed index is left for the checkpoint reader to report with its own message.
    """
    try:
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
        names = sorted({name for name in weight_map.values() if isinstance(name, str)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ["*.safetensors"]
    return names or ["*.safetensors"]


def _snapshot(repo_id: str, revision: str, cache: Path, patterns: list[str], *, offline: bool, label: str) -> Path:
    """snapshot_download restricted to `patterns`, its errors turned into one-line input errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{label} `{repo_id}` revision `{revision}`"
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns, local_files_only=offline
            )
        )
    except IncompleteSnapshotError as exc:
        raise InputError(
            f"{what}: the cached snapshot is incomplete ({_first_line(exc)}); "
            f"{_download_hint(repo_id, revision, cache)}"
        ) from None
    except LocalEntryNotFoundError as exc:
        raise _not_cached(repo_id, revision, cache, offline=offline, label=label, exc=exc) from None
    except RevisionNotFoundError:
        raise ManifestError(f"{what}: the Hub has no such revision; give an existing commit, tag or branch") from None
    except GatedRepoError:
        raise InputError(
            f"{what}: the repository is gated; accept its terms on the Hub and log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ManifestError(
            f"{what}: no such repository on the Hub (or it is private: log in with `hf auth login`)"
        ) from None
    except HFValidationError as exc:
        raise ManifestError(f"{what}: {_first_line(exc)}") from None
    except HfHubHTTPError as exc:
        raise InputError(f"{what}: the Hub answered with an error ({_first_line(exc)})") from None
    except OSError as exc:  # e.g. an unreadable cache folder
        raise InputError(f"{what}: cannot use the cache `{cache}`: {exc.strerror or exc}") from None


def _storage(cache: Path, repo_id: str) -> Path:
    """The cache's folder for a model repository (its blobs, refs and snapshots)."""
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo_id, repo_type="model")


def _not_cached(
    repo_id: str, revision: str, cache: Path, *, offline: bool, label: str, exc: LocalEntryNotFoundError
) -> InputError:
    """The error for a snapshot that is neither cached nor downloadable, saying which part is missing."""
    why = "HF_HUB_OFFLINE is set" if offline else f"the Hub cannot be reached ({_first_line(exc.__cause__ or exc)})"
    hint = _download_hint(repo_id, revision, cache)
    storage = _storage(cache, repo_id)
    if not storage.is_dir():
        return ManifestError(
            f"{label} `{repo_id}` (revision `{revision}`) is not in the local Hugging Face cache "
            f"`{cache}` and {why}: {hint}, or point `cache_dir` (or HF_HUB_CACHE) at the cache that holds it"
        )
    short = " (a commit is given in full, 40 hex digits)" if re.fullmatch(r"[0-9a-f]{4,39}", revision) else ""
    return ManifestError(
        f"{label} `{repo_id}` has no revision `{revision}` in the local Hugging Face cache `{cache}` "
        f"(cached: {cached_revisions(storage)}){short} and {why}: {hint}"
    )


def cached_revisions(storage: Path) -> str:
    """The branches and tags (refs/) and commits (snapshots/) a repository's cache folder holds, briefly."""
    refs_dir = storage / "refs"
    refs = sorted(str(p.relative_to(refs_dir)) for p in refs_dir.rglob("*") if p.is_file()) if refs_dir.is_dir() else []
    snapshots = storage / "snapshots"
    commits = sorted(p.name[:12] for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    shown = refs[:8] + [f"commit {c}" for c in commits[:4]]
    more = len(refs) + len(commits) - len(shown)
    return (", ".join(shown) or "nothing") + (f" and {more} more" if more > 0 else "")


def _download_hint(repo_id: str, revision: str, cache: Path) -> str:
    return f"run `hf download {repo_id} --revision {revision} --cache-dir {cache}` first"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
