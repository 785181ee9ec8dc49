"""The manifest (v1): a strict pydantic schema, loaded from YAML with line-numbered errors."""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import Annotated

from mergekit_lite.errors import ManifestError
from mergekit_lite.yamlsource import Loc, dotted, load_yaml

DType = Literal["float32", "float16", "bfloat16", "auto"]
METRICS = ("max_abs_logit_diff", "mean_kl", "top1_agreement", "greedy_match")
AUTO_PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate computes these device maps
MAX_MANIFEST_BYTES = 2**20  # a manifest is a few hundred bytes; this refuses /dev/zero and friends
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", re.ASCII)
_REVISION = re.compile(r"\w[\w.+-]*(/[\w.+-]+)*", re.ASCII)  # a commit, a tag or a branch (`refs/pr/1` too)
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def _short_form(field: str):
    """Accept a bare string where a mapping has one required field."""

    def convert(value: Any) -> Any:
        return {field: value} if isinstance(value, str) else value

    return convert


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Located(_Strict):
    """Where an input comes from: a local folder (`path`) or a hub repository (`id`, `revision`)."""

    path: str | None = None
    id: str | None = None
    revision: str | None = None

    @field_validator("id")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and (not _REPO_ID.fullmatch(value) or "--" in value or ".." in value or len(value) > 96):
            raise ValueError(f"{value[:60]!r} is not a Hugging Face repository id such as `org/name` "
                             "(letters, digits, `-`, `_`, `.`; a local folder goes in `path`)")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and (not _REVISION.fullmatch(value) or ".." in value):
            raise ValueError(f"{value[:60]!r} is not a revision: give a commit hash (40 hex digits), a tag or a branch")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> _Located:
        if (self.path is None) == (self.id is None):
            raise ValueError("give exactly one of `path` or `id`")
        if self.revision is not None and self.id is None:
            raise ValueError("`revision` goes with `id`, not with `path`")
        return self


class Source(_Located):
    """A local folder (`path`) or a hub repository (`id` with a pinned `revision`)."""


class AdapterSpec(_Located):
    """One PEFT LoRA adapter (a local folder `path`, or a hub `id` and `revision`) and the weight
    its delta is multiplied by.

    `allow_pickle: true` lets mergekit-lite read an adapter that ships only a pickle
    (`adapter_model.bin`), and then only through `torch.load(weights_only=True)`, which refuses
    anything but tensors. It is off by default because unpickling can run arbitrary code.
    """

    weight: float = Field(default=1.0, allow_inf_nan=False)
    allow_pickle: bool = Field(
        default=False,
        description="Read a pickle-only adapter (adapter_model.bin) with torch.load(weights_only=True).",
    )


class OutputSpec(_Strict):
    """Where the release goes and how it is sharded."""

    path: str
    max_shard_size: str | int = "5GB"
    overwrite: bool = False

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        parse_size(value)
        return value


class VerifySpec(_Strict):
    """Tuning of the verification gate."""

    enabled: bool = True
    prompts: list[str] | None = None
    logits: bool = True
    max_new_tokens: int = Field(default=16, ge=0)
    thresholds: dict[Literal[METRICS], float] = Field(default_factory=dict)  # type: ignore[valid-type]
    # placement of the end-to-end check's two models (PEFT's reference and the release), with accelerate
    device_map: str | None = Field(default=None, description="Where the end-to-end models go: cpu, cuda, cuda:N, "
                                   "auto, balanced, balanced_low_0 or sequential (default: the manifest's device_map).")
    max_memory: dict[str, str | int] | None = Field(
        default=None, description="Per device memory budget for `device_map: auto` (a GPU index, cpu, mps), e.g. {'0': 20GB, cpu: 64GB}.")
    offload_folder: str | None = Field(default=None, description="Where weights that fit nowhere else are offloaded "
                                       "(a temporary folder inside it, removed afterwards; default: the system's temporary folder).")

    @field_validator("device_map")
    @classmethod
    def _placement(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"cpu|auto|balanced|balanced_low_0|sequential|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not one of cpu, cuda, cuda:N, auto, balanced, balanced_low_0, sequential")
        return value

    @field_validator("max_memory")
    @classmethod
    def _budgets(cls, value: dict[str, str | int] | None) -> dict[str, str | int] | None:
        for device, size in (value or {}).items():
            if not re.fullmatch(r"\d+|cpu|mps|disk", device):
                raise ValueError(f"{device[:40]!r} is not a device: give a GPU index ('0'), cpu, mps or disk")
            parse_size(size)
        return value

    @model_validator(mode="after")
    def _auto_placement(self) -> VerifySpec:
        if (self.max_memory is not None or self.offload_folder is not None) and self.device_map not in AUTO_PLACEMENTS:
            raise ValueError("`max_memory` and `offload_folder` place the models with accelerate: set "
                             "`verify.device_map: auto` (or balanced, balanced_low_0, sequential) with them")
        return self


class ExecutorSpec(_Strict):
    """Where the shards of the merge are computed and written.

    `local`: threads of this process (the default). `processes`: `workers` processes on this machine.
    `ray`: one Ray task per shard on the cluster at `address`, each task on `cpus_per_worker` CPUs,
    at most `workers` at a time; every node must reach the inputs and the output folder at the same paths.
    """

    kind: Literal["local", "processes", "ray"] = "local"
    workers: int | None = Field(default=None, ge=1, description="processes: how many (default: one per CPU core); "
                                "ray: at most this many shards in flight (default: as many as the cluster schedules).")
    address: str | None = Field(default=None, description="ray: `auto` (a running cluster), `ray://HOST:PORT`, "
                                "HOST:PORT, or `local` (default: RAY_ADDRESS, else a new single-machine instance).")
    cpus_per_worker: int | None = Field(default=None, ge=1, description="ray: CPUs each task asks for and uses (default 1).")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"auto|local|ray://[\w.:\[\]-]+|[\w.\[\]:-]+:\d+", value):
            raise ValueError(f"{value[:60]!r} is not a Ray address: give `auto`, `local`, `ray://HOST:PORT` or HOST:PORT")
        return value

    @model_validator(mode="after")
    def _fits_kind(self) -> ExecutorSpec:
        if self.kind == "local" and self.workers is not None:
            raise ValueError("`workers` goes with `kind: processes` or `kind: ray`; `local` merges on threads of this process")
        for key in ("address", "cpus_per_worker"):
            if self.kind != "ray" and getattr(self, key) is not None:
                raise ValueError(f"`{key}` goes with `kind: ray`, not `kind: {self.kind}`")
        return self



COMBINE_METHODS = ("sum", "cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                   "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
DENSITY_METHODS = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                   "magnitude_prune", "magnitude_prune_svd")
SIGN_METHODS = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
RANDOM_METHODS = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


class CombineSpec(_Strict):
    """How several adapters are combined (each adapter's `weight` is its weight here).

    `sum` (the default): W' = W + sum_i weight_i s_i B_i A_i, exactly, in fp32, rounded once; the
    adapters stay separate, as PEFT's unmerged forward with all of them active.

    Every other method is PEFT's `add_weighted_adapter(adapters, weights, combination_type=method, ...)`
    followed by `merge_and_unload()` of the new adapter, with the same results (bitwise the same
    combined factors on the CPU): `cat` (exact: the factors stacked, rank = sum of ranks), `svd`
    (the weighted sum of the deltas, truncated to `svd_rank`), `linear`, `ties`, `dare_linear`,
    `dare_ties`, `magnitude_prune`, and the `<method>_svd` variants (the method applied to the
    deltas, then truncated). Note that PEFT's `linear` (and `ties`, `dare_*`, `magnitude_prune`)
    combines the A factors and the B factors separately, with weights sqrt(weight_i s_i): the result
    B A holds cross terms B_j A_i between adapters and is NOT the sum of the deltas; use `sum` or
    `cat` for that. `linear`, `ties`, `dare_*` and `magnitude_prune` need adapters of one rank.
    The combination runs on the CPU in fp32, module by module; the dare methods draw their masks from
    a generator seeded with `seed`, as PEFT does from torch's after `torch.manual_seed(seed)`.
    """

    method: Literal[COMBINE_METHODS] = "sum"  # type: ignore[valid-type]
    density: float | None = Field(default=None, gt=0, le=1, description="ties, dare_*, magnitude_prune (and their "
                                  "_svd variants): the share of values kept, 0 < density <= 1.")
    majority_sign_method: Literal["total", "frequency"] | None = Field(
        default=None, description="ties, dare_ties (and _svd): how the sign of each value is elected (PEFT's default: total).")
    svd_rank: int | None = Field(default=None, ge=1, description="svd methods: rank of the combined adapter "
                                 "(default: the largest of the adapters' ranks).")
    svd_clamp: float | None = Field(default=None, gt=0, le=1, description="svd methods: clamp the factors' entries "
                                    "to this quantile of their magnitudes (default: no clamping).")
    svd_full_matrices: bool | None = Field(default=None, description="svd methods: full (PEFT's default, true) or "
                                           "reduced SVD; reduced needs far less memory for large matrices.")
    seed: int | None = Field(default=None, ge=0, description="dare methods: the seed of the random masks (default 0).")

    @model_validator(mode="after")
    def _parameters_fit(self) -> CombineSpec:
        uses = {"density": DENSITY_METHODS, "majority_sign_method": SIGN_METHODS, "svd_rank": SVD_METHODS,
                "svd_clamp": SVD_METHODS, "svd_full_matrices": SVD_METHODS, "seed": RANDOM_METHODS}
        for key, methods in uses.items():
            if getattr(self, key) is not None and self.method not in methods:
                raise ValueError(f"`{key}` goes with {', '.join(methods)}; `{self.method}` does not use it")
        if self.method in DENSITY_METHODS and self.density is None:
            raise ValueError(f"`{self.method}` needs `density`, the share of values kept (0 < density <= 1)")
        return self


SourceField = Annotated[Source, BeforeValidator(_short_form("path"), json_schema_input_type=str | Source)]
AdapterField = Annotated[AdapterSpec, BeforeValidator(_short_form("path"), json_schema_input_type=str | AdapterSpec)]
OutputField = Annotated[OutputSpec, BeforeValidator(_short_form("path"), json_schema_input_type=str | OutputSpec)]
ExecutorField = Annotated[ExecutorSpec, BeforeValidator(_short_form("kind"), json_schema_input_type=str | ExecutorSpec)]
CombineField = Annotated[CombineSpec, BeforeValidator(_short_form("method"), json_schema_input_type=str | CombineSpec)]


class Manifest(_Strict):
    """mergekit-lite manifest, version 1."""

    version: Literal[1] = 1
    base: SourceField
    adapters: list[AdapterField] = Field(min_length=1)
    combine: CombineField = Field(default_factory=CombineSpec)
    dtype: DType = "auto"
    device_map: str = "cpu"
    output: OutputField
    tokenizer: str = "adapter"
    cache_dir: str | None = Field(default=None, description="Hugging Face cache for `id` sources (default: HF_HUB_CACHE).")
    verify: VerifySpec = Field(default_factory=VerifySpec)
    executor: ExecutorField = Field(default_factory=ExecutorSpec)

    @field_validator("device_map")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not one of cpu, cuda, cuda:N, auto")
        return value


@dataclass(frozen=True)
class HubPin:
    """A hub source resolved to a local snapshot folder: what the manifest asked for, what was found."""

    where: str  # the manifest key: `base` or `adapters[i]`
    repo_id: str
    revision: str  # as requested; `main` when the manifest gave none
    commit: str  # the commit that revision resolved to
    folder: Path  # the snapshot folder (its files may be symlinks into the cache's blobs/)
    storage: Path  # the repository's folder in the cache (`models--org--name`)

    def record(self) -> dict[str, str]:
        """The receipt's entry for this source."""
        return {"source": self.where, "id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "path": str(self.folder)}


class LoadedManifest:
    """A validated manifest plus the folder its relative paths are resolved against.

    Hub sources (`id`) have no folder until they are resolved (`with_pins`, called once by
    pipeline.prepare); afterwards `base_path` and `adapter_paths` are plain local folders.
    """

    def __init__(self, manifest: Manifest, source: Path, lines: dict[Loc, int] | None = None,
                 pins: tuple[HubPin, ...] = ()) -> None:
        self.manifest = manifest
        self.source = source
        self.root = source.parent
        self.lines = lines or {}
        self.pins = {pin.where: pin for pin in pins}

    def resolve(self, path: str) -> Path:
        """A path from the manifest, made absolute against the manifest's folder."""
        try:
            p = Path(path).expanduser()
            return (p if p.is_absolute() else self.root / p).resolve()
        except (RuntimeError, ValueError, OSError) as exc:  # `~nobody-here/x`, a NUL byte, a symlink loop
            raise ManifestError(f"{self.source.name}: path {path[:80]!r} cannot be used: {exc}") from None

    def at(self, *loc: str | int) -> str:
        """`manifest.yaml:LINE` for a key of the manifest (the nearest enclosing key that has a line)."""
        line = _line_for(loc, self.lines)
        return f"{self.source.name}:{line}" if line else self.source.name

    def sources(self) -> list[tuple[str, _Located]]:
        """Every input source with its manifest key: `base`, then `adapters[i]` in order."""
        return [("base", self.manifest.base), *((f"adapters[{i}]", a) for i, a in enumerate(self.manifest.adapters))]

    def with_pins(self, pins: list[HubPin]) -> LoadedManifest:
        """This manifest with its hub sources resolved: each `revision` pinned to the commit found
        (so that the resolved manifest reproduces the release), and `cache_dir` made absolute."""
        by_key = {pin.where: pin for pin in pins}
        m = self.manifest

        def pinned(where: str, spec: Any) -> Any:
            pin = by_key.get(where)
            return spec if pin is None else spec.model_copy(update={"revision": pin.commit})

        update: dict[str, Any] = {"base": pinned("base", m.base),
                                  "adapters": [pinned(f"adapters[{i}]", a) for i, a in enumerate(m.adapters)]}
        if m.cache_dir is not None:
            update["cache_dir"] = str(self.resolve(m.cache_dir))
        return LoadedManifest(m.model_copy(update=update), self.source, self.lines, tuple(pins))

    def _folder(self, where: str, spec: _Located) -> Path:
        if spec.path is not None:
            return self.resolve(spec.path)
        pin = self.pins.get(where)
        if pin is None:
            raise ManifestError(f"{self.source.name}: `{where}.id` ({spec.id}) is a hub source that has not been "
                                "resolved yet (pipeline.prepare resolves it)")
        return pin.folder

    @property
    def base_path(self) -> Path:
        return self._folder("base", self.manifest.base)

    @property
    def adapter_paths(self) -> list[Path]:
        return [self._folder(f"adapters[{i}]", a) for i, a in enumerate(self.manifest.adapters)]

    @property
    def input_folders(self) -> list[Path]:
        """The folders the output must stay out of: each local input, and each hub source's whole
        repository folder in the cache (its snapshot's files are links into its blobs/)."""
        return [pin.storage if (pin := self.pins.get(where)) else self._folder(where, spec) for where, spec in self.sources()]

    @property
    def hub_sources(self) -> list[dict[str, str]]:
        """The receipt's record of each resolved hub source, in manifest order."""
        return [self.pins[where].record() for where, _ in self.sources() if where in self.pins]

    @property
    def output_path(self) -> Path:
        return self.resolve(self.manifest.output.path)

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.manifest.output.max_shard_size)


def parse_size(value: str | int) -> int:
    """`5GB` -> 5_000_000_000, `200KiB` -> 204_800 (Hugging Face conventions); ints are bytes."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as 5GB")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"{value!r} is not a size such as 5GB, 500MB or 2GiB")
        number, unit = float(match.group(1)), match.group(2).upper()
    if not math.isfinite(number * _SIZE_UNITS[unit]):
        raise ValueError(f"{value[:20]!r}... is not a size such as 5GB, 500MB or 2GiB")
    size = int(number * _SIZE_UNITS[unit])
    if size < 1:
        raise ValueError(f"{value!r}: a shard size must be at least one byte")
    return size


def load_manifest(path: str | Path) -> LoadedManifest:
    """Read, parse and validate a manifest file. Raises ManifestError with the key and line."""
    source = Path(path)
    text = _read_text(source)
    data, lines = load_yaml(text, source.name)
    if not isinstance(data, dict):
        raise ManifestError(f"{source.name}:1: a manifest is a YAML mapping with `base`, `adapters` and `output`")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_describe(exc, lines, source.name)) from None
    loaded = LoadedManifest(manifest, source.resolve(), lines)
    for path in [manifest.base.path, *(a.path for a in manifest.adapters), manifest.output.path, manifest.cache_dir]:
        if path is not None:
            loaded.resolve(path)  # a path that cannot be resolved is refused now, before any work
    if manifest.verify.offload_folder is not None:  # made absolute here: the gate knows no manifest folder
        verify = manifest.verify.model_copy(update={"offload_folder": str(loaded.resolve(manifest.verify.offload_folder))})
        loaded = LoadedManifest(manifest.model_copy(update={"verify": verify}), source.resolve(), lines)
    return loaded


def _read_text(source: Path) -> str:
    """The manifest's text; a folder, a FIFO, a device or a huge file is refused before reading."""
    try:
        st = os.stat(source)
        if stat.S_ISDIR(st.st_mode):
            raise ManifestError(f"manifest `{source}` is a folder, not a YAML file")
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"manifest `{source}` is not a regular file (a FIFO or a device?); give a YAML file")
        with open(source, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(f"manifest `{source}` does not exist") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ManifestError(f"cannot read manifest `{source}`: {exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest `{source}` is larger than {MAX_MANIFEST_BYTES} bytes; a manifest is a small YAML file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ManifestError(f"{source.name}:{line}: the manifest is not UTF-8 text (byte {raw[exc.start]:#04x})") from None


def _describe(exc: ValidationError, lines: dict[Loc, int], source: str) -> str:
    errors = exc.errors(include_url=False)
    # a misspelt key also makes the key it should have been missing: name the misspelling first
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc: Loc = tuple(first["loc"]) if first["type"] == "extra_forbidden" else _clean(first["loc"])
    line = _line_for(loc, lines)
    where = f"{source}:{line}" if line else source
    key = dotted(loc) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        message = f"unknown key `{key}`{hint} (allowed here: {', '.join(allowed)})"
    elif kind == "missing":
        message = f"missing required key `{key}`"
    else:
        value = first.get("input")
        text = repr(value)
        shown = f" (got {text if len(text) <= 60 else text[:57] + '...'})" if not isinstance(value, (dict, list)) else ""
        # a union (`str | int`) fails once per member, at the same key: say all of it at once
        wants = dict.fromkeys(_plain(e["msg"]) for e in errors if e["type"] != "extra_forbidden" and _clean(e["loc"]) == loc)
        said = [w if i == 0 else w.removeprefix("Input should be ") for i, w in enumerate(wants)] or [_plain(first["msg"])]
        message = f"`{key}`: {' or '.join(said)}{shown}"
    problems = len({_clean(e["loc"]) for e in errors})
    more = f" (and {problems - 1} more problem{'s' if problems > 2 else ''})" if problems > 1 else ""
    return f"{where}: {message}{more}"


def _clean(loc: Any) -> Loc:
    """Drop pydantic's union-member and dict-key markers (`str`, `int`, `[key]`), which are not manifest keys."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p)))


def _plain(msg: str) -> str:
    """pydantic's wording without its class names: a short form takes a mapping or a path."""
    short = {"Source", "AdapterSpec", "OutputSpec"}
    return re.sub(r"a valid dictionary or instance of (\w+)",
                  lambda m: "a mapping or a path string" if m.group(1) in short else "a mapping", msg)


def _line_for(loc: Loc, lines: dict[Loc, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _allowed_keys(loc: Loc) -> list[str]:
    model: Any = Manifest
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    if get_origin(annotation) is not None:
        return None
    return None


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of manifest v1."""
    return Manifest.model_json_schema()
