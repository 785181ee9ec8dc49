"""The end-to-end models in bounded memory: both run in float32 one decoder layer at a time.

Each model is built by transformers from its config with its parameters on the meta device (no
memory), PEFT's LoRA layers added to the reference the same way. A pass runs every prompt through
layer 0 of every model, then layer 1, ...: a layer's weights are read from the safetensors files
(the base's, the release's; pread into memory, no rewritten offload copy), made float32, assigned
into transformers' own module (so the math is transformers' and PEFT's), run on the hidden states
of all prompts, and dropped before the next layer is read. The adapters' factors (small) are held
throughout, and so are the embeddings, final norm and head of each model. Peak memory is about one
layer per model, the embeddings and heads, and the prompts' activations and KV caches.

The top of each model (embeddings, masks, rotary position embeddings, then final norm and head)
runs through the model's own forward with its decoder layers swapped out: first for recorders that
keep each layer's inputs, then for stand-ins that hand the last layer's output to the head.

Greedy tokens come one pass per token (a KV cache per prompt, per model and per layer): N new tokens
cost N passes, each reading the base and the release once. The ideal merge of the calibration is a
third model: each of its layers is PEFT's merge of that layer of the reference, in float32, rounded
once to the output dtype (gate/calibrate.py does the same to the whole model).
"""

from __future__ import annotations

import ctypes
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from mergekit_lite.io.format import TensorEntry
from mergekit_lite.io.reader import read_entry

# model types whose layer-streamed logits are tested equal to the whole model's (tests/test_streamed.py)
STREAMED_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma2", "phi3"})


class Unsupported(Exception):
    """This model cannot be run layer by layer here (the reason is the message): the whole-model path runs."""


@dataclass
class Unit:
    """The tensors of one part of a model (a decoder layer, or everything outside them): per tensor,
    where it is stored, and every (module, attribute) that holds it (tied weights hold one tensor twice)."""

    slots: list[tuple[str, list[tuple[torch.nn.Module, str, bool]], torch.Tensor]] = field(default_factory=list)
    modules: list[torch.nn.Module] = field(default_factory=list)


@dataclass
class Skeleton:
    """One model on the meta device: its layers, where its tensors are stored, and how a loaded
    part is finished (`finish`: the ideal merge's merge and rounding)."""

    root: torch.nn.Module  # the transformers model (inside the PeftModel for the reference)
    peft: Any | None
    layers: torch.nn.ModuleList
    entries: dict[str, TensorEntry]
    outside: Unit
    units: list[Unit]
    finish: Callable[[Unit], None] | None = None


def unsupported_reason(config: dict[str, Any], model_class: str | None) -> str | None:
    """Why this architecture cannot be streamed (None when it can)."""
    kind = config.get("model_type")
    if kind not in STREAMED_TYPES:
        return f"model type `{kind}` is not one the layer-by-layer runner is tested on ({', '.join(sorted(STREAMED_TYPES))})"
    if model_class is not None and not model_class.endswith("ForCausalLM") and model_class != "GPT2LMHeadModel":
        return f"model class `{model_class}` is not a causal LM"
    return None


def _meta_model(folder: Path, model_class: str | None):
    """The model of `folder`'s config in float32, parameters on the meta device, buffers (rotary
    frequencies) computed on the CPU as at loading."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, model_class or "AutoModelForCausalLM")
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, dtype=torch.float32)
        else:
            model = cls._from_config(config, dtype=torch.float32)
    model.tie_weights()  # as from_pretrained does: a tied head holds the embedding's tensor
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the one made from the config stays
        pass
    return model.eval()


def release_skeleton(folder: Path, entries: dict[str, TensorEntry], model_class: str | None) -> Skeleton:
    """The release, as transformers builds it from its config, read from `entries` (its files)."""
    return _skeleton(_meta_model(folder, model_class), None, entries, [])


def reference_skeleton(
    base: Path,
    entries: dict[str, TensorEntry],
    adapters: list[tuple[Path, float]],
    model_class: str | None,
    *,
    ideal: torch.dtype | None = None,
) -> Skeleton:
    """PEFT's base + adapters, unmerged (each adapter's scaling x its manifest weight), the base read
    from `entries`; with `ideal`, each part once loaded is merged by PEFT and rounded to that dtype."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _meta_model(base, model_class)
    names = [f"adapter_{i}" for i in range(len(adapters))]
    # PEFT moves loaded factors to the device of the base layer, the meta device here: kept in memory instead
    with mock.patch.object(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", lambda *_, **__: None):
        peft_model = PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0], low_cpu_mem_usage=True)
        for name, (path, _) in zip(names[1:], adapters[1:]):
            peft_model.load_adapter(path, adapter_name=name, low_cpu_mem_usage=True)
    if len(names) > 1:
        peft_model.base_model.set_adapter(names)
    scale_adapters(peft_model, names, [w for _, w in adapters])
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if param.device.type == "meta" or not param.is_floating_point():
                continue
            param.data = param.data.to(torch.float32)
            if ideal is not None and "lora_" not in pname:  # a copy used as it is (modules_to_save): rounded now
                param.data = param.data.to(ideal).to(torch.float32)
    finish = None if ideal is None else (lambda unit: _merge_and_round(unit, ideal))
    return _skeleton(peft_model.eval().base_model.model, peft_model, entries, names, finish)


def scale_adapters(peft_model, names: list[str], weights: list[float]) -> None:
    """Each adapter's scaling in every LoRA layer multiplied by its manifest weight."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, weight in zip(names, weights):
                if name in module.scaling:
                    module.scaling[name] *= weight


def _skeleton(root, peft_model, entries: dict[str, TensorEntry], adapter_names: list[str], finish=None) -> Skeleton:
    layers = _decoder_layers(root)
    in_layer = {id(m) for layer in layers for m in layer.modules()}
    tied = dict(getattr(root, "all_tied_weights_keys", None) or {})  # tied name -> the name it shares
    outside = _unit(root, lambda module: id(module) not in in_layer, entries, adapter_names, tied)
    units = [
        _unit(layer, lambda _: True, entries, adapter_names, tied, prefix=_prefix(root, layer)) for layer in layers
    ]
    return Skeleton(root, peft_model, layers, entries, outside, units, finish)


def _decoder_layers(root) -> torch.nn.ModuleList:
    """The model's one list of decoder layers (as many as the config's num_hidden_layers)."""
    count = root.config.get_text_config().num_hidden_layers
    found = [m for m in root.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count and count > 0]
    if len(found) != 1:
        raise Unsupported(f"{len(found)} module lists of {count} layers (one list of decoder layers expected)")
    return found[0]


def _prefix(root, module) -> str:
    return next(name for name, m in root.named_modules() if m is module) + "."


def storage_key(name: str) -> str:
    """Where a module's tensor is stored: its name without PEFT's wrappers (`base_layer`, `original_module`)."""
    for wrapper in (".base_layer.", ".original_module.", ".token_adapter."):
        name = name.replace(wrapper, ".")
    return name


def _adapter_owned(name: str, adapter_names: list[str]) -> bool:
    parts = name.split(".")
    return any(a in parts for a in adapter_names)


def _unit(module, keep, entries, adapter_names: list[str], tied: dict[str, str], prefix: str = "") -> Unit:
    """The tensors of `module`'s submodules that `keep` selects, each resolved to its stored name;
    the holders of one stored tensor (a tied head and its embedding) get one tensor."""
    unit = Unit()
    groups: dict[str, tuple[list[tuple[torch.nn.Module, str, bool]], torch.Tensor]] = {}
    for mname, sub in module.named_modules(remove_duplicate=False):
        if not keep(sub):
            continue
        unit.modules.append(sub)
        for is_param, holder in ((True, sub._parameters), (False, sub._buffers)):
            for attr, tensor in holder.items():
                full = f"{prefix}{mname}.{attr}" if mname else f"{prefix}{attr}"
                if tensor is None or _adapter_owned(full, adapter_names):
                    continue
                stored = _stored(full, entries, tied)
                if not stored and not is_param and tensor.device.type != "meta":
                    continue  # a buffer computed at construction (rotary frequencies)
                if not stored:
                    raise Unsupported(
                        f"`{storage_key(full)}` is not stored under that name (a layout converted at loading)"
                    )
                empty = torch.empty(tensor.shape, device="meta")
                holders, _ = groups.setdefault(stored, ([], torch.nn.Parameter(empty, False) if is_param else empty))
                holders.append((sub, attr, is_param))
    unit.slots = [(stored, holders, meta) for stored, (holders, meta) in groups.items()]
    return unit


def _stored(name: str, entries: dict[str, TensorEntry], tied: dict[str, str]) -> str:
    """The stored name of the model's tensor `name`: its own, the tensor it is tied to, or without
    the base model's prefix (a checkpoint saved without it, such as the original GPT-2); "" if none."""
    key = storage_key(name)
    if key in entries:
        return key
    if key in tied:
        return _stored(tied[key], entries, {})
    rest = key.partition(".")[2]
    return rest if rest in entries else ""


def _load(unit: Unit, entries: dict[str, TensorEntry], fetched: dict[str, torch.Tensor], copy: bool) -> None:
    """Read each tensor of `unit` (float32) and put it in every module that holds it; a tensor in
    `fetched` (read for another model from the same files) is not read again, and with `copy` (the
    model changes it) it is copied."""
    for stored, holders, meta in unit.slots:
        if stored not in fetched:
            fetched[stored] = read_entry(entries[stored]).to(torch.float32)
        value = fetched[stored].clone() if copy else fetched[stored]
        if tuple(value.shape) != tuple(meta.shape):
            raise ValueError(f"`{stored}` is stored as {list(value.shape)}, the model expects {list(meta.shape)}")
        tensor = torch.nn.Parameter(value, requires_grad=False) if holders[0][2] else value
        for module, attr, is_param in holders:
            (module._parameters if is_param else module._buffers)[attr] = tensor


def _drop(unit: Unit) -> None:
    """Put the meta tensors back: the part's memory is freed; PEFT's merge state is reset."""
    for _, holders, meta in unit.slots:
        for module, attr, is_param in holders:
            (module._parameters if is_param else module._buffers)[attr] = meta
    for module in unit.modules:
        if hasattr(module, "merged_adapters"):
            module.merged_adapters = []


def _merge_and_round(unit: Unit, dtype: torch.dtype) -> None:
    """The ideal merge of one loaded part: PEFT's merge of each LoRA layer in float32, then every
    weight read from the files rounded once to `dtype`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        for module in unit.modules:
            if isinstance(module, BaseTunerLayer) and not module.merged:
                module.merge(safe_merge=False)
        for _, holders, _ in unit.slots:
            module, attr, is_param = holders[0]
            value = (module._parameters if is_param else module._buffers)[attr]
            if is_param and value.is_floating_point():
                value.data = value.data.to(dtype).to(torch.float32)


@dataclass
class Job:
    """One model's run of the prompts: the reference, the base (the reference with its adapters off),
    the ideal merge or the release, with its KV cache per prompt (None: no tokens follow)."""

    skeleton: Skeleton
    disabled: bool = False
    caches: list[Any] | None = None

    def context(self):
        return self.skeleton.peft.disable_adapter() if self.disabled else nullcontext()


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer `index` in the model's own forward: keeps the layer's inputs
    (all but the hidden states) and hands the hidden states on unchanged."""

    def __init__(self, index: int, calls: list[Any]) -> None:
        super().__init__()
        self.index, self.calls = index, calls

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            self.calls[self.index] = (True, args[1:], kwargs, args[0])
            return args[0]
        hidden = kwargs.pop("hidden_states")
        self.calls[self.index] = (False, (), kwargs, hidden)
        return hidden


class _Final(torch.nn.Module):
    """Stands in for a decoder layer in the model's own forward: the last one returns `value` (the
    hidden states the real layers computed), the others hand their input on."""

    def __init__(self, value: torch.Tensor | None) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.value if self.value is not None else (args[0] if args else kwargs["hidden_states"])


@contextmanager
def _swapped(layers: torch.nn.ModuleList, stand_ins: list[torch.nn.Module]) -> Iterator[None]:
    originals = list(layers)
    for i, module in enumerate(stand_ins):
        layers[i] = module
    try:
        yield
    finally:
        for i, module in enumerate(originals):
            layers[i] = module


def _top(skeleton: Skeleton, seq: torch.Tensor, cache: Any) -> Any:
    """The model's own forward on one sequence (batch of one), continuing `cache` when given."""
    params = inspect.signature(skeleton.root.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    extra = {name: cache, "use_cache": True} if cache is not None else {"use_cache": False}
    return skeleton.root(input_ids=seq.unsqueeze(0), **extra)


def new_cache(skeleton: Skeleton) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=skeleton.root.config)


def run_pass(
    jobs: list[Job], inputs: list[list[torch.Tensor]], reduce: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
) -> list[list[Any]]:
    """Logits [positions, vocab] (float64) of every job on each of its sequences: the prompts, or one
    new token each after what the jobs' caches hold; with `reduce`, reduce(logits, sequence) instead,
    made as each sequence's logits are (so that they are not all held). Every layer of every model is
    read once."""
    n = len(jobs[0].skeleton.layers)
    if any(len(job.skeleton.layers) != n for job in jobs):
        raise Unsupported("the models have different numbers of layers")
    states: list[list[torch.Tensor]] = []
    calls: list[list[list[Any]]] = []
    with torch.no_grad():
        for job, seqs in zip(jobs, inputs):
            states.append([])
            calls.append([])
            for p, seq in enumerate(seqs):
                kept: list[Any] = [None] * n
                with job.context(), _swapped(job.skeleton.layers, [_Recorder(i, kept) for i in range(n)]):
                    _top(job.skeleton, seq, job.caches[p] if job.caches else None)
                states[-1].append(kept[0][3])
                calls[-1].append(kept)
        for i in range(n):
            _layer_step(jobs, i, states, calls)
        out = []
        for job, seqs, hidden in zip(jobs, inputs, states):
            out.append([])
            for p, seq in enumerate(seqs):
                stand_ins = [_Final(None) for _ in range(n - 1)] + [_Final(hidden[p])]
                with job.context(), _swapped(job.skeleton.layers, stand_ins):
                    logits = _top(job.skeleton, seq, job.caches[p] if job.caches else None).logits
                logits = logits.reshape(-1, logits.shape[-1]).to(torch.float64)
                out[-1].append(logits if reduce is None else reduce(logits, seq))
                del logits
    return out


def _layer_step(jobs: list[Job], i: int, states: list[list[torch.Tensor]], calls: list[list[list[Any]]]) -> None:
    """Layer i of every model, loaded once, run on every job's hidden states, dropped."""
    skeletons: list[Skeleton] = []
    for job in jobs:
        if not any(job.skeleton is s for s in skeletons):
            skeletons.append(job.skeleton)
    fetched: dict[int, dict[str, torch.Tensor]] = {}
    for skeleton in sorted(skeletons, key=lambda s: s.finish is not None):  # an unchanged copy first
        unit = skeleton.units[i]
        _load(unit, skeleton.entries, fetched.setdefault(id(skeleton.entries), {}), copy=skeleton.finish is not None)
        try:
            if skeleton.finish is not None:
                skeleton.finish(unit)
            layer = skeleton.layers[i]
            for j, job in enumerate(jobs):
                if job.skeleton is not skeleton:
                    continue
                with job.context():
                    for p, hidden in enumerate(states[j]):
                        positional, rest, kwargs, _ = calls[j][p][i]
                        out = (
                            layer(hidden, *rest, **kwargs)
                            if positional
                            else layer(*rest, hidden_states=hidden, **kwargs)
                        )
                        if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
                            raise Unsupported(f"decoder layer {type(layer).__name__} returns {type(out).__name__}")
                        states[j][p] = out
        finally:
            _drop(unit)
    fetched.clear()


def load_outside(skeleton: Skeleton) -> None:
    """Read what lies outside the decoder layers (embeddings, final norm, head): held for the run."""
    _load(skeleton.outside, skeleton.entries, {}, copy=False)
    if skeleton.finish is not None:
        skeleton.finish(skeleton.outside)


def drop_outside(skeleton: Skeleton) -> None:
    _drop(skeleton.outside)


@dataclass
class Models:
    """The reference, the release and (for the calibration) the ideal merge, ready to run layer by layer."""

    reference: Skeleton
    release: Skeleton
    ideal: Skeleton | None

    @property
    def skeletons(self) -> list[Skeleton]:
        return [s for s in (self.reference, self.release, self.ideal) if s is not None]


@contextmanager
def opened(
    base: Path,
    adapters: list[tuple[Path, float]],
    candidate: Path,
    model_class: str | None,
    *,
    ideal: torch.dtype | None = None,
) -> Iterator[Models]:
    """The models of the end-to-end check, built on the meta device; their embeddings and heads are
    read for the block and dropped after it (the layers are read pass by pass)."""
    from mergekit_lite.sources.checkpoint import read_tensors

    _map_large_allocations()
    _, base_entries = read_tensors(base)
    _, release_entries = read_tensors(candidate)
    models = Models(
        reference_skeleton(base, base_entries, adapters, model_class),
        release_skeleton(candidate, release_entries, model_class),
        None if ideal is None else reference_skeleton(base, base_entries, adapters, model_class, ideal=ideal),
    )
    for skeleton in (models.reference, models.ideal):  # the release's end-of-sequence ids (endtoend.same_stop_ids)
        if skeleton is not None:
            skeleton.root.generation_config.eos_token_id = models.release.root.generation_config.eos_token_id
    eos = models.release.root.generation_config.eos_token_id  # as endtoend.same_stop_ids: the release's
    for skeleton in (models.reference, models.ideal):
        if skeleton is not None:
            skeleton.root.generation_config.eos_token_id = eos
    try:
        for skeleton in models.skeletons:
            load_outside(skeleton)
        yield models
    finally:
        for skeleton in models.skeletons:
            drop_outside(skeleton)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _map_large_allocations() -> None:
    """Have glibc map every allocation of 1 MiB or more and unmap it when freed (for the rest of the
    process). Layer tensors of many sizes, freed and made again layer after layer, otherwise
    fragment the heap: measured on the 1 GB synthetic model, RSS crept from 1.8 to 2.6 GiB over four
    passes without this, and stayed at 1.8-1.84 GiB with it. A no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def logits(
    models: Models,
    ids: list[torch.Tensor],
    *,
    base: bool = False,
    reduce: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
) -> dict[str, list[Any]]:
    """Per-position logits [positions, vocab] (float64) of the reference, the release, the ideal merge
    (when `models` has one) and, with `base`, the base alone, on each sequence of token ids (with
    `reduce`, see run_pass): one pass over the layers."""
    chosen = {"reference": Job(models.reference), "release": Job(models.release)}
    if models.ideal is not None:
        chosen["ideal"] = Job(models.ideal)
    if base:
        chosen["base"] = Job(models.reference, disabled=True)
    return dict(zip(chosen, run_pass(list(chosen.values()), [ids] * len(chosen), reduce)))


@dataclass
class Greedy:
    """What the check needs from the models: the prompts' logits per model, and per generating model
    its n greedy tokens after each prompt with the logits each token was chosen from."""

    logits: dict[str, list[torch.Tensor]]
    tokens: dict[str, list[list[int]]]
    chosen_from: dict[str, list[torch.Tensor]]


def greedy(models: Models, ids: list[torch.Tensor], n: int) -> Greedy:
    """The prompts' logits of the reference, the base, the release and the ideal merge, and n greedy
    tokens of each but the base (no early stop: end-of-sequence ids are never chosen, as with
    generate's min_new_tokens); n passes over the layers, the later ones one token each with a KV cache."""
    names = ["reference", "release", *(["ideal"] if models.ideal is not None else [])]
    skeletons = {"reference": models.reference, "release": models.release, "ideal": models.ideal}
    jobs = [Job(skeletons[name], caches=[new_cache(skeletons[name]) for _ in ids] if n > 1 else None) for name in names]
    first = run_pass([*jobs, Job(models.reference, disabled=True)], [ids] * (len(jobs) + 1))
    result = Greedy(dict(zip([*names, "base"], first)), {name: [[] for _ in ids] for name in names}, {})
    rows = {name: [[] for _ in ids] for name in names}
    last = {name: [seq_logits[-1] for seq_logits in result.logits[name]] for name in names}
    for step in range(n):
        for name in names:
            mask = _eos_mask(skeletons[name], last[name][0].shape[-1])
            for p, row in enumerate(last[name]):
                rows[name][p].append(row)
                result.tokens[name][p].append(int(row.masked_fill(mask, float("-inf")).argmax()))
        if step + 1 < n:
            nxt = [[torch.tensor([result.tokens[name][p][-1]]) for p in range(len(ids))] for name in names]
            out = run_pass(jobs, nxt)
            last = {name: [seq_logits[-1] for seq_logits in out[k]] for k, name in enumerate(names)}
    result.chosen_from = {name: [torch.stack(r) if r else torch.empty(0) for r in rows[name]] for name in names}
    return result


def _eos_mask(skeleton: Skeleton, vocab: int) -> torch.Tensor:
    eos = getattr(skeleton.root.generation_config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[[i for i in ids if 0 <= i < vocab]] = True
    return mask
