"""The manifest (v1): the sections of sections.py assembled into one strict pydantic schema, loaded
from YAML with line-numbered errors, its paths resolved against the manifest's folder."""

from __future__ import annotations

import difflib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from mergekit_lite.errors import ManifestError
from mergekit_lite.manifest.sections import (
    AdapterField,
    BaseField,
    CombineField,
    CombineSpec,
    DType,
    ExecutorField,
    ExecutorSpec,
    Fp8Spec,
    Located,
    OutputField,
    Strict,
    VerifySpec,
    check_device_map,
)
from mergekit_lite.manifest.yamlsource import Loc, dotted, load_yaml
from mergekit_lite.sizes import parse_size

MAX_MANIFEST_BYTES = 2**20  # a manifest is a few hundred bytes; this refuses /dev/zero and friends


class Manifest(Strict):
    """mergekit-lite manifest, version 1."""

    version: Literal[1] = 1
    base: BaseField
    adapters: list[AdapterField] = Field(min_length=1)
    combine: CombineField = Field(default_factory=CombineSpec)
    dtype: DType = "auto"
    device_map: str = "cpu"
    output: OutputField
    tokenizer: str = Field(
        default="adapter",
        description="`adapter` (the first adapter folder shipping one, else the base), `base`, a folder, or `none` "
        "(publish without a tokenizer).",
    )
    license: str | None = Field(
        default=None, description="The release's license for its model card, when the base's card and config name none."
    )
    cache_dir: str | None = Field(
        default=None, description="Hugging Face cache for `id` sources (default: HF_HUB_CACHE)."
    )
    verify: VerifySpec = Field(default_factory=VerifySpec)
    executor: ExecutorField = Field(default_factory=ExecutorSpec)
    fp8: Fp8Spec | None = None

    @field_validator("device_map")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device_map(value)

    @model_validator(mode="after")
    def _fp8_options(self) -> Manifest:
        if self.fp8 is not None and self.dtype != "float8_e4m3fn":
            raise ValueError(
                f"`fp8` sets how an FP8 release is quantized; it needs `dtype: float8_e4m3fn`, not {self.dtype}"
            )
        return self


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
        return {
            "source": self.where,
            "id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "path": str(self.folder),
        }


class LoadedManifest:
    """A validated manifest plus the folder its relative paths are resolved against.

    Hub sources (`id`) have no folder until they are resolved (`with_pins`, called once by
    pipeline.prepare); afterwards `base_path` and `adapter_paths` are plain local folders.
    """

    def __init__(
        self, manifest: Manifest, source: Path, lines: dict[Loc, int] | None = None, pins: tuple[HubPin, ...] = ()
    ) -> None:
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

    def sources(self) -> list[tuple[str, Located]]:
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

        update: dict[str, Any] = {
            "base": pinned("base", m.base),
            "adapters": [pinned(f"adapters[{i}]", a) for i, a in enumerate(m.adapters)],
        }
        if m.cache_dir is not None:
            update["cache_dir"] = str(self.resolve(m.cache_dir))
        return LoadedManifest(m.model_copy(update=update), self.source, self.lines, tuple(pins))

    def _folder(self, where: str, spec: Located) -> Path:
        if spec.path is not None:
            return self.resolve(spec.path)
        pin = self.pins.get(where)
        if pin is None:
            raise ManifestError(
                f"{self.source.name}: `{where}.id` ({spec.id}) is a hub source that has not been "
                "resolved yet (pipeline.prepare resolves it)"
            )
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
        return [
            pin.storage if (pin := self.pins.get(where)) else self._folder(where, spec)
            for where, spec in self.sources()
        ]

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
    verify, absolute = manifest.verify, {}  # made absolute here: the gate knows no manifest folder
    if verify.offload_folder is not None:
        absolute["offload_folder"] = str(loaded.resolve(verify.offload_folder))
    if verify.eval is not None:
        absolute["eval"] = verify.eval.model_copy(update={"path": str(loaded.resolve(verify.eval.path))})
    if absolute:
        verify = verify.model_copy(update=absolute)
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
        raise ManifestError(
            f"manifest `{source}` is larger than {MAX_MANIFEST_BYTES} bytes; a manifest is a small YAML file"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ManifestError(
            f"{source.name}:{line}: the manifest is not UTF-8 text (byte {raw[exc.start]:#04x})"
        ) from None


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
        shown = (
            f" (got {text if len(text) <= 60 else text[:57] + '...'})" if not isinstance(value, (dict, list)) else ""
        )
        # a union (`str | int`) fails once per member, at the same key: say all of it at once
        wants = dict.fromkeys(
            _plain(e["msg"]) for e in errors if e["type"] != "extra_forbidden" and _clean(e["loc"]) == loc
        )
        said = [w if i == 0 else w.removeprefix("Input should be ") for i, w in enumerate(wants)] or [
            _plain(first["msg"])
        ]
        message = f"`{key}`: {' or '.join(said)}{shown}"
    problems = len({_clean(e["loc"]) for e in errors})
    more = f" (and {problems - 1} more problem{'s' if problems > 2 else ''})" if problems > 1 else ""
    return f"{where}: {message}{more}"


def _clean(loc: Any) -> Loc:
    """Drop pydantic's union-member and dict-key markers (`str`, `int`, `[key]`), which are not manifest keys."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p)))


def _plain(msg: str) -> str:
    """pydantic's wording without its class names: a short form takes a mapping or a path."""
    short = {"Source", "BaseSource", "AdapterSpec", "OutputSpec", "EvalSpec"}
    return re.sub(
        r"a valid dictionary or instance of (\w+)",
        lambda m: "a mapping or a path string" if m.group(1) in short else "a mapping",
        msg,
    )


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
