"""A base checkpoint folder: its tensors (from headers only), its config, its embeddings.

The model class, the embeddings' names, whether they are tied, and how the on-disk names load as
module names come from transformers' own model class, built on the meta device
(sources/architecture.py). That costs a noticeable share of a merge (importing transformers,
AutoConfig and the modeling module; the model itself is cheap: docs/performance.md), and the
answer depends only on config.json's bytes, the tensor names, the adapters' task type and the
transformers version. So it is remembered under those in architectures.json, beside the digest
cache (digests.cache_folder); a rerun on the same base does not import transformers at all. A
failed build is not remembered.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_lite.errors import CheckpointError
from mergekit_lite.io.digests import JsonStore, cache_folder
from mergekit_lite.io.format import DuplicateKey, TensorEntry, no_duplicates, read_header
from mergekit_lite.sources.architecture import Architecture
from mergekit_lite.sources.architecture import describe as describe_architecture
from mergekit_lite.sources.quantized import dequantized_tensors, describe, simulated

log = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
MAX_JSON_BYTES = 64 * 2**20  # the index of a 400B-parameter model is a few MB
ARCH_FILE = "architectures.json"
ARCH_LIMIT = 200  # checkpoints remembered; the oldest go first


@dataclass
class Checkpoint:
    """The base model as the plan sees it: tensor entries in file order, and its config."""

    path: Path
    tensors: dict[str, TensorEntry]
    files: list[Path]
    config: dict[str, Any]
    tied: bool
    input_embedding: str | None
    output_embedding: str | None
    extra_files: list[Path] = field(default_factory=list)
    quantization: str = ""  # how the base is quantized (sources/quantized.py), e.g. `bitsandbytes nf4`; "" if dense
    architecture: Architecture = field(default_factory=lambda: Architecture(None, False, None, None))


def read_checkpoint(path: Path, task_type: str | None = None, dequantize: str | None = None) -> Checkpoint:
    """Read a safetensors checkpoint folder's headers, index and config.json; with `dequantize`
    (nf4, fp4), its Linear weights are read as QLoRA's (sources/quantized.simulated).

    `task_type` is the adapters' PEFT task type: with the base's `architectures` it picks the model
    class (architecture.model_class_name) whose embeddings and module names count.
    """
    if not path.exists():
        raise CheckpointError(f"base `{path}` does not exist")
    if not path.is_dir():
        raise CheckpointError(f"base `{path}` is not a folder (give the folder that holds config.json)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"base `{path}` has no config.json; is it a transformers checkpoint folder?")
    config = read_json(config_file)
    files, tensors = read_tensors(path)
    tensors = dequantized_tensors(path, config, tensors)
    arch = _architecture(path, config, tensors, task_type)
    inp, out = _embeddings(arch, tensors)
    for role, name in (("input", inp), ("output", out)):
        if name in tensors and len(tensors[name].shape) != 2:
            raise CheckpointError(
                f"base `{path}`: the {role} embedding `{name}` has shape {list(tensors[name].shape)}; "
                "an embedding is [vocab, hidden]"
            )
    if dequantize is not None:
        tensors = simulated(path, tensors, dequantize, (inp, out))
    quantization = describe(tensors)
    return Checkpoint(path, tensors, files, config, arch.tied, inp, out, quantization=quantization, architecture=arch)


def read_tensors(path: Path) -> tuple[list[Path], dict[str, TensorEntry]]:
    """The weight files of a safetensors folder and its tensors, from headers and index, checked."""
    files = weight_files(path)
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        for name, entry in read_header(file).tensors.items():
            if name in tensors:
                raise CheckpointError(
                    f"`{path}`: tensor `{name}` is in both `{tensors[name].file.name}` and `{file.name}`"
                )
            tensors[name] = entry
    if not tensors:
        raise CheckpointError(f"`{path}` holds no tensors")
    _check_index(path, tensors)
    return files, tensors


def read_json(path: Path, unique_keys: bool = False) -> dict[str, Any]:
    """Read a JSON object from a file another tool wrote; errors name the file.

    With `unique_keys`, a key given twice in one object is an error rather than last-one-wins.
    """
    try:
        if not path.is_file():  # never open a FIFO or a device
            raise CheckpointError(f"`{path}` does not exist or is not a regular file")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"`{path}` is larger than {MAX_JSON_BYTES} bytes; too large for a JSON config")
        text = path.read_text(encoding="utf-8")
        data = json.loads(text, object_pairs_hook=no_duplicates if unique_keys else None)
    except FileNotFoundError:
        raise CheckpointError(f"`{path}` does not exist") from None
    except DuplicateKey as exc:
        raise CheckpointError(f"`{path}` gives the key `{exc.args[0]}` twice") from None
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8, bad JSON, an integer of 4300+ digits
        raise CheckpointError(f"`{path}` is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise CheckpointError(f"`{path}` is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"`{path}` is not a JSON object")
    return data


def weight_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        weight_map = read_json(index, unique_keys=True).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"`{index}` has no `weight_map`")
        names: list[str] = []
        for shard in weight_map.values():
            if not isinstance(shard, str) or any(c in shard for c in "/\\\0") or shard in ("", ".", ".."):
                raise CheckpointError(
                    f"`{index}` names shard {shard!r}: only plain file names in the folder are allowed"
                )
            if not shard.endswith(".safetensors"):
                raise CheckpointError(f"`{index}` names shard `{shard}`: only .safetensors shards are read")
            if shard not in names:
                names.append(shard)
        return [path / n for n in sorted(names)]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles
    if any((path / n).exists() for n in PICKLE_NAMES):
        raise CheckpointError(
            f"base `{path}` has only pickle weights (.bin); convert it to safetensors first, e.g. "
            "`AutoModelForCausalLM.from_pretrained(p).save_pretrained(p2)`"
        )
    if any(path.glob("*.gguf")):
        raise CheckpointError(
            f"base `{path}` holds only GGUF files (llama.cpp's quantized format), which mergekit-lite does not "
            "dequantize; convert it to safetensors first, e.g. `AutoModelForCausalLM.from_pretrained(p, "
            "gguf_file=...).save_pretrained(p2)`"
        )
    raise CheckpointError(f"base `{path}` has no model.safetensors or {INDEX}")


def _check_index(path: Path, tensors: dict[str, TensorEntry]) -> None:
    index = path / INDEX
    if not index.is_file():
        return
    weight_map: dict[str, str] = read_json(index, unique_keys=True)["weight_map"]
    for name, shard in weight_map.items():
        entry = tensors.get(name)
        if entry is None:
            raise CheckpointError(f"`{index}` lists `{name}` in `{shard}`, but that shard does not hold it")
        if entry.file.name != shard:
            raise CheckpointError(f"`{index}` puts `{name}` in `{shard}`, but it is in `{entry.file.name}`")
    for name, entry in tensors.items():
        if name not in weight_map:
            raise CheckpointError(f"`{entry.file.name}` holds `{name}`, which `{index.name}` does not list")


def _architecture(
    path: Path, config: dict[str, Any], tensors: dict[str, TensorEntry], task_type: str | None
) -> Architecture:
    """The base's model class, embeddings and key mapping (architecture.describe), cached."""
    folder = cache_folder()
    key = _architecture_key(path, list(tensors), task_type) if folder is not None else None
    store = JsonStore(folder if key else None, ARCH_FILE, ARCH_LIMIT, _is_architecture)
    cached = Architecture.from_json(store.get(key)) if key else None
    if cached is not None:
        return cached
    try:
        arch = describe_architecture(path, list(tensors), task_type)
    except Exception as exc:  # an architecture transformers does not know: fall back on names
        log.warning("cannot build %s's architecture on the meta device (%s); guessing embedding names", path, exc)
        return Architecture(None, bool(config.get("tie_word_embeddings", False)), None, None)
    if key and key == _architecture_key(path, list(tensors), task_type):  # config.json unchanged meanwhile
        store.put(key, arch.to_json())
        store.save()
    return arch


def _embeddings(arch: Architecture, tensors: dict[str, TensorEntry]) -> tuple[str | None, str | None]:
    """The input and output embeddings' on-disk names (the output's may be one not stored, when tied)."""
    to_disk = {module: disk for disk, module in arch.renames.items()}
    inp = _match(to_disk.get(arch.input_embedding or "", arch.input_embedding), tensors)
    for alias in arch.aliases.get(arch.input_embedding or "", []):  # stored under a name it is tied to
        inp = inp or _match(to_disk.get(alias, alias), tensors)  # (Marian's encoder embedding: `model.shared`)
    inp = inp or next((n for n in tensors if n.endswith(("embed_tokens.weight", "wte.weight"))), None)
    out_name = to_disk.get(arch.output_embedding or "") or arch.output_on_disk or arch.output_embedding
    out = _match(out_name, tensors, allow_missing=True) or (
        "lm_head.weight" if "lm_head.weight" in tensors or arch.tied else None
    )
    return inp, out


def _transformers_version() -> str | None:
    """The installed transformers' version, read from its metadata (no import of transformers)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


# bumped whenever architecture.describe / model_class_name would answer differently for the same
# inputs, so that answers cached by an older mergekit-lite are not reused
ARCHITECTURE_RULES = 2


def _architecture_key(path: Path, tensor_names: list[str], task_type: str | None) -> str | None:
    """What describe's answer depends on: config.json's bytes, the tensor names, the adapter's task
    type, the transformers version and the version of describe's own rules."""
    version = _transformers_version()
    if version is None:
        return None
    try:
        digest = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    except OSError:
        return None
    names = hashlib.sha256("\0".join(sorted(tensor_names)).encode()).hexdigest()[:32]
    return f"{digest}|{names}|{task_type or ''}|transformers=={version}|rules={ARCHITECTURE_RULES}"


def _is_architecture(value: Any) -> bool:
    """A cached Architecture (its to_json form)."""
    return Architecture.from_json(value) is not None


def _match(name: str | None, tensors: dict[str, TensorEntry], allow_missing: bool = False) -> str | None:
    """Map a module-derived name onto the checkpoint's naming (which may drop the first prefix)."""
    if name is None:
        return None
    if name in tensors:
        return name
    short = name.split(".", 1)[1] if "." in name else name
    if short in tensors:
        return short
    return name if allow_missing else None
