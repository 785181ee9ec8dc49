"""The manifest's sections (v1): strict pydantic models, one per key of the manifest.

load.py assembles them into the Manifest and loads it from YAML."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from mergekit_lite.sizes import parse_size
from mergekit_lite.vocabulary import COMBINE_METHODS, COMBINE_NAMES, COMBINE_PARAMETERS, methods_taking

DType = Literal["float32", "float16", "bfloat16", "auto", "float8_e4m3fn"]
METRICS = (
    "max_abs_logit_diff",
    "mean_kl",
    "top1_agreement",
    "greedy_match",
    "eval_token_loss_diff",  # verify.eval (gate/eval.py)
    "eval_perplexity_diff",
)
AUTO_PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate computes these device maps
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", re.ASCII)
_REVISION = re.compile(r"\w[\w.+-]*(/[\w.+-]+)*", re.ASCII)  # a commit, a tag or a branch (`refs/pr/1` too)


def check_device_map(value: str, placements: tuple[str, ...] = ("auto",)) -> str:
    """`value` if it names a device (cpu, cuda, cuda:N) or one of `placements`; else a ValueError listing them."""
    if not re.fullmatch(rf"cpu|cuda(:\d+)?|{'|'.join(placements)}", value):
        raise ValueError(f"{value!r} is not one of cpu, cuda, cuda:N, {', '.join(placements)}")
    return value


def _short_form(field: str):
    """Accept a bare string where a mapping has one required field."""

    def convert(value: Any) -> Any:
        return {field: value} if isinstance(value, str) else value

    return convert


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Located(Strict):
    """Where an input comes from: a local folder (`path`) or a hub repository (`id`, `revision`)."""

    path: str | None = None
    id: str | None = None
    revision: str | None = None

    @field_validator("id")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and (not _REPO_ID.fullmatch(value) or "--" in value or ".." in value or len(value) > 96):
            raise ValueError(
                f"{value[:60]!r} is not a Hugging Face repository id such as `org/name` "
                "(letters, digits, `-`, `_`, `.`; a local folder goes in `path`)"
            )
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and (not _REVISION.fullmatch(value) or ".." in value):
            raise ValueError(f"{value[:60]!r} is not a revision: give a commit hash (40 hex digits), a tag or a branch")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Located:
        if (self.path is None) == (self.id is None):
            raise ValueError("give exactly one of `path` or `id`")
        if self.revision is not None and self.id is None:
            raise ValueError("`revision` goes with `id`, not with `path`")
        return self


class Source(Located):
    """A local folder (`path`) or a hub repository (`id` with a pinned `revision`)."""


class BaseSource(Source):
    """The base model. With `dequantize: nf4` (or `fp4`) on a 16-bit base, the adapters are merged
    into the weights a QLoRA run trained against: each Linear weight quantized by bitsandbytes, as
    transformers' BitsAndBytesConfig(load_in_4bit=True, double quant) does, and dequantized
    (needs bitsandbytes). A base stored quantized is always merged into its dequantized weights."""

    dequantize: Literal["nf4", "fp4"] | None = None


class AdapterSpec(Located):
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


class GgufSpec(Strict):
    """`output.gguf`: a GGUF file made by llama.cpp's own converter from the verified release."""

    outtype: Literal["bf16", "f16", "f32", "q8_0"] = "bf16"
    llama_cpp: str | None = Field(
        default=None,
        description="A llama.cpp folder with convert_hf_to_gguf.py (default: $MERGEKIT_LITE_LLAMA_CPP, "
        "then .cache/runtimes/llama.cpp as `make runtimes` makes it, then convert_hf_to_gguf.py on PATH).",
    )
    modelfile: bool = Field(default=True, description="Also write an Ollama Modelfile for the GGUF file.")


class OutputSpec(Strict):
    """Where the release goes and how it is sharded."""

    path: str
    max_shard_size: str | int = "5GB"
    overwrite: bool = False
    compat: bool = Field(
        default=True,
        description="Write config.json and tokenizer_config.json that transformers 4.4x reads as "
        "transformers 5 does (legacy keys beside v5's); false ships them as the source has them.",
    )
    gguf: Annotated[GgufSpec | None, BeforeValidator(_short_form("outtype"))] = None

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        parse_size(value)
        return value


class EvalSpec(Strict):
    """The user's own data for the gate (gate/eval.py): a JSON Lines file, one record a line, each
    with `text` (a string) or chat `messages` (a list of {role, content}, formatted with the
    tokenizer's chat template), as TRL and `datasets.Dataset.to_json` write them."""

    path: str
    max_samples: int = Field(default=64, ge=1, description="Records read from the top of the file (default 64).")
    max_length: int = Field(default=512, ge=2, description="Tokens kept of each record, from its start (default 512).")


EvalField = Annotated[EvalSpec, BeforeValidator(_short_form("path"), json_schema_input_type=str | EvalSpec)]


class VerifySpec(Strict):
    """Tuning of the verification gate."""

    enabled: bool = True
    prompts: list[str] | None = None
    logits: bool = True
    max_new_tokens: int = Field(default=16, ge=0)
    thresholds: dict[Literal[METRICS], float] = Field(default_factory=dict)  # type: ignore[valid-type]
    eval: EvalField | None = Field(
        default=None,
        description="Per-token loss and perplexity of the base, of base + adapters and of the release on "
        "your own JSON Lines data: {path, max_samples, max_length}, or just the path.",
    )
    runtimes: list[Literal["transformers4", "ctranslate2", "onnxruntime-genai", "llama.cpp"]] = Field(
        default_factory=list,
        description="Also load the release in these runtimes and compare with transformers 5 in float32: "
        "transformers4 (a Python with transformers 4: `make runtimes`, or $MERGEKIT_LITE_TRANSFORMERS4), "
        "ctranslate2 (`pip install 'mergekit-lite[ctranslate2]'`), onnxruntime-genai "
        "(`pip install 'mergekit-lite[onnxruntime-genai]'`), llama.cpp (llama-cpp-python: `pip install "
        "'mergekit-lite[llama-cpp]'`, `make runtimes`, or $MERGEKIT_LITE_LLAMA_CPP_PYTHON; and llama.cpp's "
        "converter, found as for `output.gguf`).",
    )
    in_flight: bool = Field(
        default=True,
        description="Check each tensor (algebra, every element) while the merge writes the shards, reading it "
        "back from its file as soon as it is written; false: read the finished, fsync'd shards after the "
        "merge (slower where the disk is slow; what it reads is what is on disk after the last write).",
    )
    layer_by_layer: bool | None = Field(
        default=None,
        description="Run the end-to-end models in float32 one decoder layer at a time, read from the "
        "safetensors files (bounded memory); default: when the two whole float32 models would take more "
        "than half the memory available ($MERGEKIT_LITE_LAYER_BY_LAYER=1 or 0 also decides).",
    )
    # placement of the end-to-end check's two models (PEFT's reference and the release), with accelerate
    device_map: str | None = Field(
        default=None,
        description="Where the end-to-end models go: cpu, cuda, cuda:N, "
        "auto, balanced, balanced_low_0 or sequential (default: the manifest's device_map).",
    )
    max_memory: dict[str, str | int] | None = Field(
        default=None,
        description="Per device memory budget for `device_map: auto` (a GPU index, cpu, mps), e.g. {'0': 20GB, cpu: 64GB}.",
    )
    offload_folder: str | None = Field(
        default=None,
        description="Where weights that fit nowhere else are offloaded "
        "(a temporary folder inside it, removed afterwards; default: the system's temporary folder).",
    )

    @field_validator("device_map")
    @classmethod
    def _placement(cls, value: str | None) -> str | None:
        return value if value is None else check_device_map(value, AUTO_PLACEMENTS)

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
            raise ValueError(
                "`max_memory` and `offload_folder` place the models with accelerate: set "
                "`verify.device_map: auto` (or balanced, balanced_low_0, sequential) with them"
            )
        return self


class Fp8Spec(Strict):
    """`fp8`: how `dtype: float8_e4m3fn` quantizes a dense base, as transformers' FineGrainedFP8Config
    takes it (an FP8 base keeps its own layout)."""

    modules_to_not_convert: list[str] | None = Field(
        default=None,
        description="Modules kept dense (transformers' patterns: a prefix, a regex or a suffix). As in "
        "transformers, a list replaces its defaults (lm_head, tied weights, _keep_in_fp32_modules).",
    )
    weight_block_size: list[int] = Field(default_factory=lambda: [128, 128], description="[rows, columns] of a block.")

    @field_validator("weight_block_size")
    @classmethod
    def _block(cls, value: list[int]) -> list[int]:
        if len(value) != 2 or min(value) < 1:
            raise ValueError(f"{value!r} is not [rows, columns] of a block, two positive integers such as [128, 128]")
        return value


class ExecutorSpec(Strict):
    """Where the shards of the merge are computed and written.

    `local`: threads of this process (the default). `processes`: `workers` processes on this machine.
    `ray`: one Ray task per shard on the cluster at `address`, each task on `cpus_per_worker` CPUs,
    at most `workers` at a time; every node must reach the inputs and the output folder at the same paths.
    """

    kind: Literal["local", "processes", "ray"] = "local"
    workers: int | None = Field(
        default=None,
        ge=1,
        description="processes: how many (default: one per CPU core); "
        "ray: at most this many shards in flight (default: as many as the cluster schedules).",
    )
    address: str | None = Field(
        default=None,
        description="ray: `auto` (a running cluster), `ray://HOST:PORT`, "
        "HOST:PORT, or `local` (default: RAY_ADDRESS, else a new single-machine instance).",
    )
    cpus_per_worker: int | None = Field(
        default=None, ge=1, description="ray: CPUs each task asks for and uses (default 1)."
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"auto|local|ray://[\w.:\[\]-]+|[\w.\[\]:-]+:\d+", value):
            raise ValueError(
                f"{value[:60]!r} is not a Ray address: give `auto`, `local`, `ray://HOST:PORT` or HOST:PORT"
            )
        return value

    @model_validator(mode="after")
    def _fits_kind(self) -> ExecutorSpec:
        if self.kind == "local" and self.workers is not None:
            raise ValueError(
                "`workers` goes with `kind: processes` or `kind: ray`; `local` merges on threads of this process"
            )
        for key in ("address", "cpus_per_worker"):
            if self.kind != "ray" and getattr(self, key) is not None:
                raise ValueError(f"`{key}` goes with `kind: ray`, not `kind: {self.kind}`")
        return self


class CombineSpec(Strict):
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

    method: Literal[COMBINE_NAMES] = "sum"  # type: ignore[valid-type]  # the names of vocabulary.COMBINE_METHODS
    density: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="ties, dare_*, magnitude_prune (and their "
        "_svd variants): the share of values kept, 0 < density <= 1.",
    )
    majority_sign_method: Literal["total", "frequency"] | None = Field(
        default=None,
        description="ties, dare_ties (and _svd): how the sign of each value is elected (PEFT's default: total).",
    )
    svd_rank: int | None = Field(
        default=None,
        ge=1,
        description="svd methods: rank of the combined adapter (default: the largest of the adapters' ranks).",
    )
    svd_clamp: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="svd methods: clamp the factors' entries "
        "to this quantile of their magnitudes (default: no clamping).",
    )
    svd_full_matrices: bool | None = Field(
        default=None,
        description="svd methods: full (PEFT's default, true) or "
        "reduced SVD; reduced needs far less memory for large matrices.",
    )
    seed: int | None = Field(default=None, ge=0, description="dare methods: the seed of the random masks (default 0).")

    @model_validator(mode="after")
    def _parameters_fit(self) -> CombineSpec:
        method = COMBINE_METHODS[self.method]
        for key in COMBINE_PARAMETERS:
            if getattr(self, key) is not None and key not in method.parameters:
                raise ValueError(f"`{key}` goes with {', '.join(methods_taking(key))}; `{self.method}` does not use it")
        if method.needs_density and self.density is None:
            raise ValueError(f"`{self.method}` needs `density`, the share of values kept (0 < density <= 1)")
        return self


SourceField = Annotated[Source, BeforeValidator(_short_form("path"), json_schema_input_type=str | Source)]
BaseField = Annotated[BaseSource, BeforeValidator(_short_form("path"), json_schema_input_type=str | BaseSource)]
AdapterField = Annotated[AdapterSpec, BeforeValidator(_short_form("path"), json_schema_input_type=str | AdapterSpec)]
OutputField = Annotated[OutputSpec, BeforeValidator(_short_form("path"), json_schema_input_type=str | OutputSpec)]
ExecutorField = Annotated[ExecutorSpec, BeforeValidator(_short_form("kind"), json_schema_input_type=str | ExecutorSpec)]
CombineField = Annotated[CombineSpec, BeforeValidator(_short_form("method"), json_schema_input_type=str | CombineSpec)]
