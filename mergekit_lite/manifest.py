"""The manifest (v1): a strict pydantic schema, loaded from YAML with line-numbered errors."""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import Annotated

from mergekit_lite.errors import ManifestError
from mergekit_lite.yamlsource import Loc, dotted, load_yaml

DType = Literal["float32", "float16", "bfloat16", "auto"]
METRICS = ("max_abs_logit_diff", "mean_kl", "top1_agreement", "greedy_match")
MAX_MANIFEST_BYTES = 2**20  # a manifest is a few hundred bytes; this refuses /dev/zero and friends
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


class Source(_Strict):
    """A local folder (`path`) or a hub repository (`id` with a pinned `revision`)."""

    path: str | None = None
    id: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        if (self.path is None) == (self.id is None):
            raise ValueError("give exactly one of `path` or `id`")
        if self.revision is not None and self.id is None:
            raise ValueError("`revision` goes with `id`, not with `path`")
        return self


class AdapterSpec(_Strict):
    """One PEFT LoRA adapter folder and the weight its delta is multiplied by.

    `allow_pickle: true` lets mergekit-lite read an adapter that ships only a pickle
    (`adapter_model.bin`), and then only through `torch.load(weights_only=True)`, which refuses
    anything but tensors. It is off by default because unpickling can run arbitrary code.
    """

    path: str
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


SourceField = Annotated[Source, BeforeValidator(_short_form("path"), json_schema_input_type=str | Source)]
AdapterField = Annotated[AdapterSpec, BeforeValidator(_short_form("path"), json_schema_input_type=str | AdapterSpec)]
OutputField = Annotated[OutputSpec, BeforeValidator(_short_form("path"), json_schema_input_type=str | OutputSpec)]


class Manifest(_Strict):
    """mergekit-lite manifest, version 1."""

    version: Literal[1] = 1
    base: SourceField
    adapters: list[AdapterField] = Field(min_length=1)
    dtype: DType = "auto"
    device_map: str = "cpu"
    output: OutputField
    tokenizer: str = "adapter"
    verify: VerifySpec = Field(default_factory=VerifySpec)

    @field_validator("device_map")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not one of cpu, cuda, cuda:N, auto")
        return value


class LoadedManifest:
    """A validated manifest plus the folder its relative paths are resolved against."""

    def __init__(self, manifest: Manifest, source: Path) -> None:
        self.manifest = manifest
        self.source = source
        self.root = source.parent

    def resolve(self, path: str) -> Path:
        """A path from the manifest, made absolute against the manifest's folder."""
        try:
            p = Path(path).expanduser()
            return (p if p.is_absolute() else self.root / p).resolve()
        except (RuntimeError, ValueError, OSError) as exc:  # `~nobody-here/x`, a NUL byte, a symlink loop
            raise ManifestError(f"{self.source.name}: path {path[:80]!r} cannot be used: {exc}") from None

    @property
    def base_path(self) -> Path:
        if self.manifest.base.path is None:
            raise ManifestError(
                f"{self.source.name}: `base.id` ({self.manifest.base.id}) needs hub resolution, which this version "
                "does not do yet; download the snapshot and give its folder as `base: {path: ...}`"
            )
        return self.resolve(self.manifest.base.path)

    @property
    def adapter_paths(self) -> list[Path]:
        return [self.resolve(a.path) for a in self.manifest.adapters]

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
    loaded = LoadedManifest(manifest, source.resolve())
    for path in [manifest.base.path, *(a.path for a in manifest.adapters), manifest.output.path]:
        if path is not None:
            loaded.resolve(path)  # a path that cannot be resolved is refused now, before any work
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
