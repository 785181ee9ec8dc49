"""Issue 9, hub sources: `base`/`adapters` given as `{id, revision}` and resolved offline from a
Hugging Face cache folder built here (`models--org--name/{blobs,snapshots,refs}`, as `hf download`
leaves it): byte-identical to the same merge from local folders, the pinned snapshot is the one
merged, the receipt and the resolved manifest pin the commit, and a revision or repository that is
not cached is one clean line (exit 2) with nothing written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from mergekit_lite.cli import main
from mergekit_lite.errors import ManifestError
from mergekit_lite.manifest.load import load_manifest
from mergekit_lite.pipeline import run_plan
from mergekit_lite.sources import hub

from release_builders import INDEX, build_adapter, build_chat_base, build_tokenizer

BASE_ID = "acme/tiny-llama"
LORA_ID = "acme/tiny-lora"
FAST = {"max_new_tokens": 4}
SHARD = "24KB"  # float32 output in several shards
UNTOUCHED = "model.norm.weight"  # differs between the two base snapshots; no LoRA touches it
RELEASE_ONLY = {"README.md", "manifest.yaml", "release.json", "SHA256SUMS", "verification.json"}


# --------------------------------------------------------------------------- a hub cache, built here


def add_to_cache(cache: Path, repo_id: str, folder: Path, refs: list[str], links: bool) -> str:
    """Put `folder` into a hub-style cache as one commit of `repo_id`; return the commit hash.

    With `links`, snapshot files are relative symlinks into `blobs/` (named by their SHA-256), as
    huggingface_hub makes them on Linux; otherwise plain files (its layout where symlinks are not
    available). Each ref file holds the bare commit, with no newline, as huggingface_hub writes it.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha1(repo_id.encode())
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    commit = digest.hexdigest()
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for path in files:
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if links:
            blob = storage / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                shutil.copyfile(path, blob)
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            shutil.copyfile(path, target)
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return commit


@dataclass(frozen=True)
class Hub:
    cache: Path
    base_new: Path  # local copy of what `main` of BASE_ID holds
    base_old: Path  # local copy of what the tag `v1.0` of BASE_ID holds
    lora: Path
    new: str  # commits
    old: str
    lora_commit: str

    def storage(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Hub:
    """BASE_ID: `main` -> a sharded tiny Llama with a tokenizer (seed 0), tag `v1.0` -> the same
    architecture with other weights (seed 1), both symlinked into blobs/; LORA_ID: `main` -> a LoRA
    on all linear layers, stored as plain files."""
    root = tmp_path_factory.mktemp("hub")
    tokenizer = build_tokenizer()
    base_new = build_chat_base(root / "local" / "base-new", tokenizer, seed=0, max_shard_size="40KB")
    base_old = build_chat_base(root / "local" / "base-old", tokenizer, seed=1, max_shard_size="40KB")
    assert (base_new / INDEX).is_file(), "the base should be sharded"
    lora = build_adapter(base_new, root / "local" / "lora", seed=3, r=4, lora_alpha=8, target_modules="all-linear")
    cache = root / "cache"
    old = add_to_cache(cache, BASE_ID, base_old, ["v1.0"], links=True)
    new = add_to_cache(cache, BASE_ID, base_new, ["main"], links=True)
    lora_commit = add_to_cache(cache, LORA_ID, lora, ["main"], links=False)
    assert len({old, new, lora_commit}) == 3
    return Hub(cache, base_new, base_old, lora, new, old, lora_commit)


@pytest.fixture(scope="module", autouse=True)
def hub_env(hub_cache: Hub):
    """HF_HUB_CACHE at the test cache for the whole module (read by sources/hub.py when it resolves)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(hub_cache.cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def write_yaml(folder: Path, doc: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def hub_doc(base: dict | str, adapters: list, verify: dict | None = None, **extra) -> dict:
    doc = {
        "base": base,
        "adapters": adapters,
        "dtype": "float32",
        "output": {"path": "./out", "max_shard_size": SHARD},
        "verify": verify or {"enabled": False},
    }
    return doc | extra


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def tree(*folders: Path) -> dict[str, tuple]:
    """Every entry under the folders (symlinks not followed) with its kind, size and mtime."""
    found = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            st = path.lstat()
            found[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def shards(release: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(release.glob("*.safetensors"))}


def tensor(folder: Path, name: str) -> bytes:
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"] if (folder / INDEX).exists() else None
    file = folder / (weight_map[name] if weight_map else "model.safetensors")
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name).numpy().tobytes()


# --------------------------------------------------------------------------- releases under test


@pytest.fixture(scope="module")
def local_release(hub_cache: Hub, tmp_path_factory) -> Path:
    """The merge from local folders (the reference the hub merge must reproduce byte for byte)."""
    m = write_yaml(tmp_path_factory.mktemp("local"), hub_doc(str(hub_cache.base_new), [str(hub_cache.lora)]))
    result = cli("merge", "-q", str(m))
    assert result.exit_code == 0, result.output
    return m.parent / "out"


@dataclass(frozen=True)
class HubRun:
    manifest: Path
    release: Path
    stderr: str


@pytest.fixture(scope="module")
def hub_release(hub_cache: Hub, tmp_path_factory) -> HubRun:
    """The same merge from hub ids, gate on: the base pinned by full commit, the adapter unpinned."""
    m = write_yaml(
        tmp_path_factory.mktemp("from-hub"),
        hub_doc({"id": BASE_ID, "revision": hub_cache.new}, [{"id": LORA_ID}], verify=FAST),
    )
    result = cli("merge", "-q", str(m))
    assert result.exit_code == 0, result.output
    return HubRun(m, m.parent / "out", result.stderr)


# --------------------------------------------------------------------------- merges


def test_hub_merge_is_byte_identical_to_the_local_merge(hub_release: HubRun, local_release: Path) -> None:
    ours, ref = shards(hub_release.release), shards(local_release)
    assert len(ref) > 1 and ours.keys() == ref.keys()
    for name in ref:
        assert ours[name] == ref[name], f"{name} differs"
    files = {p.name for p in local_release.iterdir()} - RELEASE_ONLY
    assert files >= {INDEX, "config.json", "tokenizer.json"}
    for name in files:  # the index, configs and the tokenizer (from the base snapshot) too
        assert (hub_release.release / name).read_bytes() == (local_release / name).read_bytes(), name
    verification = json.loads((hub_release.release / "verification.json").read_text())
    assert verification["passed"] is True  # the gate ran PEFT on the snapshot folders, through symlinks


@pytest.mark.parametrize("pin", ["tag", "commit"])
def test_a_pinned_revision_other_than_main_is_the_one_merged(
    hub_cache: Hub, hub_release: HubRun, pin: str, tmp_path: Path
) -> None:
    revision = "v1.0" if pin == "tag" else hub_cache.old
    m = write_yaml(
        tmp_path, hub_doc({"id": BASE_ID, "revision": revision}, [{"id": LORA_ID, "revision": hub_cache.lora_commit}])
    )
    result = cli("merge", "-q", str(m))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert tensor(out, UNTOUCHED) == tensor(hub_cache.base_old, UNTOUCHED)
    # negative controls: the two snapshots differ, and so do the releases made from them
    assert tensor(out, UNTOUCHED) != tensor(hub_cache.base_new, UNTOUCHED)
    assert shards(out) != shards(hub_release.release)
    sources = json.loads((out / "release.json").read_text())["sources"]
    assert [(s["id"], s["revision"], s["commit"]) for s in sources] == [
        (BASE_ID, revision, hub_cache.old),
        (LORA_ID, hub_cache.lora_commit, hub_cache.lora_commit),
    ]


def test_an_unpinned_revision_uses_main_and_warns(hub_cache: Hub, hub_release: HubRun) -> None:
    warnings = [line for line in hub_release.stderr.splitlines() if line.startswith("warning: ")]
    unpinned = [line for line in warnings if "gives no `revision`" in line]
    assert len(unpinned) == 1, hub_release.stderr  # the adapter's; the base is pinned
    assert "`adapters[0].id`" in unpinned[0] and hub_cache.lora_commit in unpinned[0]


# --------------------------------------------------------------------------- what the release records


def test_receipt_records_each_hub_source_and_hashes_real_content(
    hub_cache: Hub, hub_release: HubRun, local_release: Path
) -> None:
    receipt = json.loads((hub_release.release / "release.json").read_text())
    snapshot = (hub_cache.storage(BASE_ID) / "snapshots" / hub_cache.new).resolve()
    lora_snapshot = (hub_cache.storage(LORA_ID) / "snapshots" / hub_cache.lora_commit).resolve()
    assert receipt["sources"] == [  # by id and commit: no path of the build machine's cache
        {"source": "base", "id": BASE_ID, "revision": hub_cache.new, "commit": hub_cache.new},
        {"source": "adapters[0]", "id": LORA_ID, "revision": "main", "commit": hub_cache.lora_commit},
    ]
    assert str(hub_cache.cache) not in (hub_release.release / "release.json").read_text()

    def local(name: str) -> Path:  # `id@commit/file` back to the snapshot's file
        repo, _, rest = name.partition("@")
        commit, _, file = rest.partition("/")
        return (hub_cache.storage(repo) / "snapshots" / commit).resolve() / file

    inputs = {local(r["path"]): r for r in receipt["inputs"]}
    assert snapshot / "config.json" in inputs and lora_snapshot / "adapter_config.json" in inputs
    linked = [p for p in inputs if p.is_symlink()]
    assert linked, "the base snapshot's files are symlinks into blobs/"
    for path in linked:  # the digest and size are the content's, not the link's
        content = path.resolve().read_bytes()
        assert inputs[path]["sha256"] == hashlib.sha256(content).hexdigest()
        assert inputs[path]["size"] == len(content) != len(os.readlink(path))
    # negative control: a merge from local folders records no hub source
    assert json.loads((local_release / "release.json").read_text())["sources"] == []


def test_resolved_manifest_keeps_the_ids_and_pins_the_commits(hub_cache: Hub, hub_release: HubRun) -> None:
    resolved = hub_release.release / "manifest.yaml"
    doc = yaml.safe_load(resolved.read_text())
    assert doc["base"] == {"id": BASE_ID, "revision": hub_cache.new}
    assert doc["adapters"] == [{"id": LORA_ID, "revision": hub_cache.lora_commit, "weight": 1.0, "allow_pickle": False}]
    # it is a valid manifest that resolves to the same snapshots
    loaded = hub.resolve_hub_sources(load_manifest(resolved))
    assert loaded.base_path == (hub_cache.storage(BASE_ID) / "snapshots" / hub_cache.new).resolve()
    assert loaded.adapter_paths == [(hub_cache.storage(LORA_ID) / "snapshots" / hub_cache.lora_commit).resolve()]


def test_model_card_names_the_hub_base_and_adapter(hub_cache: Hub, hub_release: HubRun, local_release: Path) -> None:
    card = (hub_release.release / "README.md").read_text()
    front = card.split("---")[1]
    assert f"\nbase_model: {BASE_ID}\n" in front
    assert f"Base model `{BASE_ID}` (commit `{hub_cache.new}`)" in card
    assert f"`{LORA_ID}@{hub_cache.lora_commit}`" in card
    assert "base_model:" not in (local_release / "README.md").read_text().split("---")[1]  # negative control


def test_verify_resolves_the_hub_manifest_again(hub_release: HubRun) -> None:
    result = cli("verify", str(hub_release.manifest), "--against", str(hub_release.release))
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- plan, errors, the cache


def test_plan_works_on_a_hub_manifest(hub_cache: Hub, tmp_path: Path) -> None:
    hub_m = write_yaml(
        tmp_path / "hub", hub_doc({"id": BASE_ID, "revision": "main"}, [{"id": LORA_ID, "revision": "main"}])
    )
    local_m = write_yaml(tmp_path / "local", hub_doc(str(hub_cache.base_new), [str(hub_cache.lora)]))
    result = cli("plan", "--json", str(hub_m))
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)
    assert planned["base"] == str((hub_cache.storage(BASE_ID) / "snapshots" / hub_cache.new).resolve())
    reference = run_plan(local_m).to_dict()

    def layout(plan: dict) -> list[tuple]:
        return [(t["name"], list(t["shape"]), t["dtype"], t["shard"], len(t["ops"])) for t in plan["tensors"]]

    assert layout(planned) == layout(reference) and planned["total_bytes"] == reference["total_bytes"]
    assert any(t["ops"] for t in planned["tensors"])
    assert not (tmp_path / "hub" / "out").exists()


def _missing(h: Hub) -> list:
    """(id, manifest base, adapters, words the one error line must hold)."""
    lora = {"id": LORA_ID, "revision": h.lora_commit}
    return [
        (
            "unknown-tag",
            {"id": BASE_ID, "revision": "v9.9"},
            [lora],
            [
                "m.yaml:2: `base.id` `acme/tiny-llama` has no revision `v9.9` in the local Hugging Face cache",
                "cached: main, v1.0",
                "HF_HUB_OFFLINE is set",
                "hf download acme/tiny-llama --revision v9.9",
            ],
        ),
        (
            "unknown-commit",
            {"id": BASE_ID, "revision": "f" * 40},
            [lora],
            [f"`acme/tiny-llama` has no revision `{'f' * 40}`", "HF_HUB_OFFLINE is set"],
        ),
        (
            "short-commit",
            {"id": BASE_ID, "revision": h.new[:8]},
            [lora],
            [f"has no revision `{h.new[:8]}`", "a commit is given in full, 40 hex digits"],
        ),
        (
            "unknown-repo",
            {"id": "acme/nope", "revision": "v1.0"},
            [lora],
            [
                "`base.id` `acme/nope` (revision `v1.0`) is not in the local Hugging Face cache",
                "HF_HUB_OFFLINE is set",
                "hf download acme/nope --revision v1.0",
            ],
        ),
        (
            "unknown-adapter-repo",
            {"id": BASE_ID, "revision": h.new},
            [str(h.lora), {"id": "acme/nope-lora"}],
            ["m.yaml:6: `adapters[1].id` `acme/nope-lora` (revision `main`) is not in the local Hugging Face cache"],
        ),
    ]


@pytest.mark.parametrize(
    "index", range(5), ids=["unknown-tag", "unknown-commit", "short-commit", "unknown-repo", "unknown-adapter-repo"]
)
def test_a_revision_or_repo_not_in_the_cache_is_one_clean_line(hub_cache: Hub, tmp_path: Path, index: int) -> None:
    case_id, base, adapters, words = _missing(hub_cache)[index]
    m = write_yaml(tmp_path, hub_doc(base, adapters))
    before = tree(tmp_path, hub_cache.cache)
    result = cli("merge", str(m))
    assert result.exit_code == 2, (case_id, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert tree(tmp_path, hub_cache.cache) == before, "something was written"


def test_a_cache_miss_when_online_says_the_hub_cannot_be_reached(hub_cache: Hub, tmp_path: Path, monkeypatch) -> None:
    """HF_HUB_OFFLINE unset: huggingface_hub tries the Hub (kept offline here through its import-time
    constant, so no request leaves), falls back on the cache, and the error says why."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    cached = write_yaml(tmp_path / "cached", hub_doc({"id": BASE_ID, "revision": "v1.0"}, [{"id": LORA_ID}]))
    assert run_plan(cached).base.parent.name == "snapshots"  # a cached revision resolves without the Hub
    missing = write_yaml(tmp_path / "missing", hub_doc({"id": BASE_ID, "revision": "v9.9"}, [{"id": LORA_ID}]))
    with pytest.raises(ManifestError, match=r"has no revision `v9\.9` .* and the Hub cannot be reached"):
        run_plan(missing)


@pytest.mark.parametrize("where", ["snapshot", "blobs"])
def test_output_inside_the_cache_is_refused(hub_cache: Hub, tmp_path: Path, where: str) -> None:
    inside = {
        "snapshot": hub_cache.storage(BASE_ID) / "snapshots" / hub_cache.new / "out",
        "blobs": hub_cache.storage(BASE_ID) / "blobs" / "out",
    }[where]
    m = write_yaml(
        tmp_path, hub_doc({"id": BASE_ID, "revision": hub_cache.new}, [{"id": LORA_ID}]) | {"output": str(inside)}
    )
    before = tree(hub_cache.cache)
    result = cli("merge", str(m))
    assert result.exit_code == 2, result.output
    assert "overlaps input" in result.stderr and str(hub_cache.storage(BASE_ID).resolve()) in result.stderr
    assert tree(hub_cache.cache) == before


@pytest.mark.parametrize("given", ["manifest", "environment"])
def test_cache_dir_from_the_manifest_or_the_environment(
    hub_cache: Hub, tmp_path: Path, monkeypatch, given: str
) -> None:
    extra = {}
    if given == "manifest":
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        extra["cache_dir"] = os.path.relpath(hub_cache.cache, tmp_path)  # relative to the manifest's folder
    doc = hub_doc({"id": BASE_ID, "revision": "v1.0"}, [{"id": LORA_ID, "revision": "main"}], **extra)
    plan = run_plan(write_yaml(tmp_path, doc))
    assert plan.base == (hub_cache.storage(BASE_ID) / "snapshots" / hub_cache.old).resolve()
    # negative control: the same manifest against an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    doc.pop("cache_dir", None)
    with pytest.raises(ManifestError, match="is not in the local Hugging Face cache"):
        run_plan(write_yaml(tmp_path / "again", doc))


def test_a_manifest_without_hub_sources_never_calls_huggingface_hub(
    hub_cache: Hub, tmp_path: Path, monkeypatch
) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("snapshot_download called")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)  # hub.py imports it when it needs it
    loaded = load_manifest(write_yaml(tmp_path, hub_doc(str(hub_cache.base_new), [str(hub_cache.lora)])))
    assert hub.resolve_hub_sources(loaded) is loaded
    with_id = load_manifest(write_yaml(tmp_path / "id", hub_doc({"id": BASE_ID}, [str(hub_cache.lora)])))
    with pytest.raises(AssertionError, match="snapshot_download called"):  # control: the stub is the one in use
        hub.resolve_hub_sources(with_id)


# --------------------------------------------------------------------------- the schema and the environment


@pytest.mark.parametrize(
    ("base", "adapter", "expected"),
    [
        pytest.param(
            "{path: ./b, id: org/b}",
            "./a",
            "m.yaml:1: `base`: Value error, give exactly one of `path` or `id`",
            id="base-path-and-id",
        ),
        pytest.param(
            "./b",
            "{path: ./a, id: org/a}",
            "m.yaml:3: `adapters[0]`: Value error, give exactly one of `path` or `id`",
            id="adapter-path-and-id",
        ),
        pytest.param(
            "./b",
            "{weight: 0.5}",
            "m.yaml:3: `adapters[0]`: Value error, give exactly one of `path` or `id`",
            id="adapter-neither",
        ),
        pytest.param(
            "./b", "{path: ./a, revision: v1}", "`revision` goes with `id`, not with `path`", id="adapter-revision-path"
        ),
        pytest.param(
            "{id: 'not a repo'}",
            "./a",
            "m.yaml:1: `base.id`: Value error, 'not a repo' is not a Hugging Face repository id",
            id="id-spaces",
        ),
        pytest.param("{id: org/sub/name}", "./a", "is not a Hugging Face repository id", id="id-three-parts"),
        pytest.param("{id: org--x/name}", "./a", "is not a Hugging Face repository id", id="id-double-dash"),
        pytest.param(
            "./b",
            "{id: org/a, revision: ../../etc}",
            "m.yaml:3: `adapters[0].revision`: Value error, '../../etc' is not a revision",
            id="revision-traversal",
        ),
        pytest.param("{id: org/b, revision: 'v 1'}", "./a", "'v 1' is not a revision", id="revision-space"),
        pytest.param("{id: org/b, revision: main/}", "./a", "'main/' is not a revision", id="revision-trailing-slash"),
        pytest.param(
            "./b",
            "{id: org/a, revison: main}",
            "m.yaml:3: unknown key `adapters[0].revison`; did you mean `revision`?",
            id="misspelt-revision",
        ),
    ],
)
def test_hub_sources_in_the_schema(tmp_path: Path, base: str, adapter: str, expected: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(f"base: {base}\nadapters:\n  - {adapter}\noutput: ./out\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("base", "adapter"),
    [
        (
            "{id: HuggingFaceTB/SmolLM2-135M-Instruct, revision: 12fd25f77366fa6b3b4b768ec3050bf629380bac}",
            "{id: org/lora_v1.2, revision: refs/pr/1, weight: 0.5}",
        ),
        ("{id: gpt2}", "{id: org/a, revision: v1.0+build.2}"),
    ],
)
def test_valid_hub_sources_parse(tmp_path: Path, base: str, adapter: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(f"base: {base}\nadapters:\n  - {adapter}\noutput: ./out\ncache_dir: ./hf\n")
    loaded = load_manifest(path)
    assert loaded.manifest.base.id and loaded.manifest.adapters[0].id and loaded.manifest.adapters[0].path is None
    with pytest.raises(ManifestError, match="has not been resolved yet"):  # only pipeline.prepare gives it a folder
        loaded.base_path  # noqa: B018  (the property raises)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HF_HUB_CACHE": "/c/hub-cache", "HF_HOME": "/c/home"}, "/c/hub-cache"),
        ({"HUGGINGFACE_HUB_CACHE": "/c/legacy", "HF_HOME": "/c/home"}, "/c/legacy"),
        ({"HF_HOME": "/c/home", "XDG_CACHE_HOME": "/c/xdg"}, "/c/home/hub"),
        ({"XDG_CACHE_HOME": "/c/xdg"}, "/c/xdg/huggingface/hub"),
    ],
)
def test_cache_folder_reads_the_environment_when_called(monkeypatch, env: dict[str, str], expected: str) -> None:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hub.cache_folder() == Path(expected)
    assert hub.cache_folder(Path("/explicit")) == Path("/explicit")


@pytest.mark.parametrize(
    ("hf", "transformers", "offline"),
    [
        ("1", None, True),
        ("ON", None, True),
        ("true", None, True),
        ("0", None, False),
        (None, None, False),
        (None, "1", True),
        ("", "yes", True),
    ],
)
def test_offline_is_read_when_called(monkeypatch, hf: str | None, transformers: str | None, offline: bool) -> None:
    for name, value in (("HF_HUB_OFFLINE", hf), ("TRANSFORMERS_OFFLINE", transformers)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert hub.is_offline() is offline


def test_cached_revisions_lists_refs_and_commits(hub_cache: Hub) -> None:
    assert hub.cached_revisions(hub_cache.storage(BASE_ID)) == (
        f"main, v1.0, commit {min(hub_cache.new, hub_cache.old)[:12]}, commit {max(hub_cache.new, hub_cache.old)[:12]}"
    )
    assert hub.cached_revisions(hub_cache.cache / "models--acme--empty") == "nothing"


def test_the_unpinned_warning_goes_through_logging(hub_cache: Hub, tmp_path: Path, caplog) -> None:
    loaded = load_manifest(write_yaml(tmp_path, hub_doc({"id": BASE_ID}, [{"id": LORA_ID, "revision": "main"}])))
    with caplog.at_level(logging.WARNING, logger="mergekit_lite.sources.hub"):
        pinned = hub.resolve_hub_sources(loaded)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["m.yaml"]
    assert "`base.id` `acme/tiny-llama` gives no `revision`" in caplog.records[0].getMessage()
    assert pinned.manifest.base.revision == hub_cache.new and pinned.pins["base"].revision == "main"
