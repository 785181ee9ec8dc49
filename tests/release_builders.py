"""Builders for the gate, release and hub tests (no tests live here): a tiny real tokenizer, a
tiny Llama that matches it, PEFT adapters for it, their manifests, and tools to seed defects into
a copy of a release. test_gate.py, test_release.py and test_hub.py import it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import helpers
from builders import save_base

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

CORPUS = [
    "Hello! How are you today?",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence what a neural network is.",
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "A neural network is a function with many parameters.",
    "The sea is blue and wide.",
]
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>"]
EOS = "<|end|>"  # id 4: deliberately not the base's generation_config EOS (3), so the release must add it
BASE_EOS_ID = 3
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
HIDDEN = 32
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- inputs


def build_tokenizer(extra_tokens: list[str] | None = None):
    """A WordLevel tokenizer trained on CORPUS, as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece(prefix="##")
    raw.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token=EOS
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if extra_tokens:
        tokenizer.add_tokens(extra_tokens)
    return tokenizer


def build_chat_base(out: Path, tokenizer, tied: bool = False, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """A tiny random Llama whose vocabulary is exactly len(tokenizer), with a generation_config
    (EOS 3, not the tokenizer's EOS) and the tokenizer saved beside it; sharded when
    `max_shard_size` is given (builders.save_base does the building)."""
    from transformers import GenerationConfig, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=BASE_EOS_ID,
        pad_token_id=1,
        tie_word_embeddings=tied,
    )
    generation = GenerationConfig(bos_token_id=2, eos_token_id=BASE_EOS_ID, pad_token_id=1)
    return save_base(
        config, out, seed=seed, generation_config=generation, tokenizer=tokenizer, max_shard_size=max_shard_size
    )


def build_adapter(
    base: Path,
    out: Path,
    seed: int,
    tokenizer=None,
    resize_to: int | None = None,
    perturb: str | None = None,
    **lora_kwargs,
) -> Path:
    """A PEFT LoRA adapter that really changes the model (init_lora_weights=False; tensors whose
    name contains `perturb` get noise). With `resize_to`, the base is resized first; with
    `tokenizer`, the tokenizer is saved into the adapter folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora_kwargs.setdefault("init_lora_weights", False)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if resize_to is not None:
            torch.manual_seed(seed)
            model.resize_token_embeddings(resize_to, mean_resizing=False)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
        if perturb:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                hit = 0
                for name, param in peft_model.named_parameters():
                    if perturb in name:
                        param.add_(0.05 * torch.randn(param.shape, generator=gen))
                        hit += 1
            assert hit, f"no parameter matched {perturb!r}"
        peft_model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# The gate and release tests name their inputs by absolute path (their manifests sit apart from them).
write_manifest = functools.partial(helpers.write_manifest, absolute=True)


# --------------------------------------------------------------------------- reading adapters


def adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors with PEFT's `base_model.model.` prefix removed."""
    raw = load_file(adapter / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model."): v for k, v in raw.items()}


def lora_delta(adapter: Path, weight_name: str) -> torch.Tensor:
    """s * B @ A in float64 for the module owning `weight_name` (`...q_proj.weight`)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    module = weight_name.removesuffix(".weight")
    t = adapter_tensors(adapter)
    a, b = t[f"{module}.lora_A.weight"].double(), t[f"{module}.lora_B.weight"].double()
    scale = config["lora_alpha"] / config["r"]
    return scale * (b @ a)


# --------------------------------------------------------------------------- release surgery


def placement(folder: Path) -> dict[str, str]:
    """Tensor name -> file name, through the index when there is one."""
    if (folder / INDEX).is_file():
        return dict(json.loads((folder / INDEX).read_text())["weight_map"])
    return {k: SINGLE for k in load_file(folder / SINGLE)}


def read_release(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a release and the file it lives in."""
    where = placement(folder)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(where.values())):
        tensors.update(load_file(folder / shard))
    return tensors, where


Mutation = Callable[[dict[str, torch.Tensor], dict[str, str]], None]


def rewrite_release(folder: Path, mutate: Mutation, fix_index: bool = True) -> None:
    """Apply `mutate(tensors, where)` in place and rewrite the touched shards (metadata format=pt).

    `mutate` may change, add (with a `where` entry) or remove (from both dicts) tensors. The
    index (weight_map and total_size) is rebuilt unless `fix_index` is false; release.json's outputs
    and SHA256SUMS are regenerated so that the digests alone cannot catch the defect.
    """
    tensors, where = read_release(folder)
    before = {k: (where[k], _fingerprint(v)) for k, v in tensors.items()}
    mutate(tensors, where)
    assert set(tensors) == set(where), "mutation left `tensors` and `where` out of step"
    touched = {where[k] for k in tensors if before.get(k) != (where[k], _fingerprint(tensors[k]))}
    touched |= {shard for k, (shard, _) in before.items() if where.get(k) != shard}
    assert touched, "the mutation changed nothing"
    for shard in touched:
        names = sorted(k for k, s in where.items() if s == shard)
        if not names:
            (folder / shard).unlink()
            continue
        save_file({k: tensors[k].contiguous() for k in names}, str(folder / shard), metadata={"format": "pt"})
    if fix_index and (folder / INDEX).is_file():
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}
        (folder / INDEX).write_text(json.dumps(doc, indent=2) + "\n")
    write_sha256sums(folder)


def _fingerprint(t: torch.Tensor) -> tuple:
    """dtype, shape and raw bytes (NaN-safe equality)."""
    return t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_sha256sums(folder: Path) -> None:
    """release.json's `outputs` and SHA256SUMS regenerated over the files as they are now, like the
    release writes them: a seeded defect then passes the integrity checks and must be caught by the
    check made for it."""
    receipt = folder / "release.json"
    if receipt.is_file():
        doc = json.loads(receipt.read_text())
        outputs = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("release.json", "SHA256SUMS"))
        doc["outputs"] = [
            {"path": str(p.relative_to(folder)), "size": p.stat().st_size, "sha256": sha256(p)} for p in outputs
        ]
        receipt.write_text(json.dumps(doc, indent=2) + "\n")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    (folder / "SHA256SUMS").write_text("".join(f"{sha256(p)}  {p.relative_to(folder)}\n" for p in files))


def copy_release(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def next_ulp(t: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Each element moved one ulp of its own dtype toward +inf (`up`) or -inf."""
    inf = torch.full_like(t, float("inf"))
    return torch.where(up, torch.nextafter(t, inf), torch.nextafter(t, -inf))
