"""Gate check 3, end to end: PEFT's unmerged base + adapters against the merged release.

Both are loaded the way a user would (transformers, PEFT), placed with the manifest's device_map
(or `verify.device_map`, with `max_memory` and disk offload through accelerate for models larger
than memory), and run on the same prompts: max |logit difference|, mean KL, top-1 agreement, and greedy
continuations compared token by token. A vision-language base with an image processor also gets an
image prompt, a fixed synthetic image through its processor (gate/images.py), so that a LoRA on its
vision tower runs too.

Both run in float32, whatever the release's dtype: the base's stored weights upcast exactly, so
the only difference left is the merge itself (its one rounding to the output dtype). Running both
in bfloat16 instead would add bf16 inference noise several times larger than the merge's own
error (figures for SmolLM2-135M: docs/performance.md).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.gate.calibrate import calibrated, ideal_merge
from mergekit_lite.gate.dequantized import dequantized_base, dequantizer
from mergekit_lite.gate.fp8 import load_release as load_fp8_release
from mergekit_lite.gate.images import ImagePrompt, extended, image_prompt, is_vision_language
from mergekit_lite.gate.report import GateReport
from mergekit_lite.gate.streamed import scale_adapters
from mergekit_lite.gate.tolerances import CALIBRATION_MARGINS, within
from mergekit_lite.io.format import TensorEntry
from mergekit_lite.manifest.sections import AUTO_PLACEMENTS, VerifySpec
from mergekit_lite.plan.combine import COMBINED
from mergekit_lite.plan.plan import CombinePlan
from mergekit_lite.sizes import parse_size

DEFAULT_PROMPTS = [
    "Hello! How are you today?",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence what a neural network is.",
]
SYNTHETIC_PROMPTS = 4


def prompt_ids(
    tokenizer: Any, prompts: list[str] | None, vocab: int, avoid: frozenset[int] = frozenset()
) -> tuple[list[torch.Tensor], str]:
    """Token ids for the prompts (chat-formatted when a chat template exists), and how they were made.

    Synthetic sequences leave out the ids in `avoid` (a multimodal model's image and video
    placeholders, which a text-only input must not hold).
    """
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, min(vocab, 1000), (12,), generator=gen) for _ in range(SYNTHETIC_PROMPTS)]
        if avoid:
            allowed = torch.tensor([i for i in range(min(vocab, 1000)) if i not in avoid])
            ids = [allowed[seq % len(allowed)] for seq in ids]
        return ids, f"{SYNTHETIC_PROMPTS} synthetic token sequences (no tokenizer to encode text prompts)"
    texts = prompts or DEFAULT_PROMPTS
    out = []
    chat = bool(getattr(tokenizer, "chat_template", None))
    for text in texts:
        if chat:
            enc = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
            )
            ids = enc["input_ids"] if isinstance(enc, dict) else enc
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(torch.tensor(list(ids)))
    kind = "chat-formatted" if chat else "plain"
    source = "manifest" if prompts else "default"
    return out, f"{len(out)} {source} prompts, {kind}"


def reference_model(
    base: Path,
    adapters: list[tuple[Path, float]],
    dtype: torch.dtype,
    loading: dict[str, Any],
    *,
    embedding_rows: int | None = None,
    combine: CombinePlan | None = None,
    dequantized: dict[str, TensorEntry] | None = None,
    model_class: str | None = None,
):
    """PEFT's base + adapters, unmerged, each adapter's scaling multiplied by its manifest weight;
    with `combine`, PEFT's add_weighted_adapter of them instead (see _add_combined).

    When the adapters resize the vocabulary, the base is resized first, as the training recipe did.
    A base stored quantized (`dequantized`: its tensors) is first made dense (gate/dequantized.py).
    """
    from peft import PeftModel

    if dequantized is not None:
        model, _ = dequantized_base(base, dequantized, dtype, loading, model_class)
    else:
        model = model_loader(model_class).from_pretrained(base, dtype=dtype, **loading)
    if embedding_rows is not None and embedding_rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(embedding_rows)
    names = [f"adapter_{i}" for i in range(len(adapters))]
    # PEFT places an offloaded base again once the adapter is in: with the same budgets and folder
    redispatch = {k: v for k, v in loading.items() if k in ("max_memory", "offload_folder")}
    peft_model = PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0], **redispatch)
    for name, (path, _) in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    if combine is not None:
        _add_combined(peft_model, names, [weight for _, weight in adapters], combine)
        return peft_model.eval()
    if len(names) > 1:
        peft_model.base_model.set_adapter(names)
    scale_adapters(peft_model, names, [weight for _, weight in adapters])
    return peft_model.eval()


def _add_combined(peft_model, names: list[str], weights: list[float], combine: CombinePlan) -> None:
    """PEFT's add_weighted_adapter with the manifest's method, parameters and weights, seeded with
    torch.manual_seed(seed) (torch's generator is restored afterwards), then only the new adapter active.

    The combination runs on the CPU, as the merge's does: input factors on a GPU are moved to the
    CPU for it (they are small), and the new adapter is moved to where they were.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    homes = {id(m): _move_factors(m, names, lambda device: device.type not in ("cpu", "meta"), "cpu") for m in layers}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(combine.seed)
        peft_model.add_weighted_adapter(
            names,
            weights,
            COMBINED,
            combination_type=combine.method,
            svd_rank=combine.svd_rank,
            svd_clamp=combine.svd_clamp,
            svd_full_matrices=combine.svd_full_matrices,
            density=combine.density,
            majority_sign_method=combine.majority_sign_method,
        )
    for module in layers:
        if (home := homes[id(module)]) is not None:
            _move_factors(module, [COMBINED, *names], lambda device: device.type == "cpu", home)
    peft_model.set_adapter(COMBINED)


def _move_factors(module, names: list[str], which, to: torch.device | str) -> torch.device | None:
    """Move the named adapters' factors of one LoRA layer whose device satisfies `which` to `to`;
    the device the first of them was on (None when none moved)."""
    moved = None
    for holder in (module.lora_A, module.lora_B, module.lora_embedding_A, module.lora_embedding_B):
        for name in names:
            if name in holder:
                param = holder[name].weight if isinstance(holder[name], torch.nn.Module) else holder[name]
                if which(param.device):
                    moved = moved or param.device
                    param.data = param.data.to(to)
    return moved


COMPUTE_DTYPE = torch.float32


def model_loader(model_class: str | None) -> Any:
    """The transformers class both models are loaded with (the base's, sources/architecture.py);
    a causal LM when the base's architecture could not be built."""
    import transformers

    return getattr(transformers, model_class or "AutoModelForCausalLM")


@dataclass(frozen=True)
class Placement:
    """Where the check puts its two models, with accelerate: a device map (`auto` and its kin let
    accelerate fill the devices in turn within `max_memory`, then offload the rest to disk), the
    per-device budgets in bytes, and the folder the offloaded weights go to (None: the system's
    temporary folder). The weights are float32 on every device, so placement changes no figure.
    """

    device_map: str = "cpu"
    max_memory: dict[int | str, int] | None = None
    offload_folder: Path | None = None

    @contextmanager
    def loading(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """from_pretrained arguments for the reference and for the release; with an automatic
        device map each gets an offload folder of its own, removed with everything in it afterwards."""
        if self.device_map not in AUTO_PLACEMENTS:
            yield {"device_map": self.device_map}, {"device_map": self.device_map}
            return
        made = self.offload_folder is not None and not self.offload_folder.exists()
        if self.offload_folder is not None:
            self.offload_folder.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(prefix="mergekit-offload-", dir=self.offload_folder) as tmp:
                # PEFT 0.21 re-keys an offloaded base's safetensors files into copies named
                # os.path.join(*path.split(os.sep)) (peft_model._update_offload): the leading "/" is
                # lost, so each copy is written, and later read, relative to the working directory.
                # Working in this temporary folder keeps those copies in it, removed with it.
                previous = os.getcwd()
                os.chdir(tmp)
                try:
                    yield tuple(
                        {
                            "device_map": self.device_map,
                            "max_memory": self.max_memory,  # type: ignore[misc]
                            "offload_folder": str(Path(tmp) / part),
                        }
                        for part in ("reference", "release")
                    )
                finally:
                    os.chdir(previous)
        finally:
            if made and self.offload_folder is not None and not any(self.offload_folder.iterdir()):
                self.offload_folder.rmdir()

    def describe(self, reference, merged) -> dict[str, Any]:
        """For the report: the device map asked for, and how many modules of each model went where."""
        doc: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory is not None:
            doc["max_memory"] = {str(k): v for k, v in self.max_memory.items()}
        for name, model in (("reference", reference), ("release", merged)):
            placed = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
            doc[name] = dict(Counter(str(d) for d in placed.values()))
        return doc


def placement(settings: VerifySpec, device_map: str) -> Placement:
    """The manifest's `verify` placement, or the merge's own `device_map` when it gives none."""
    budgets = None
    if settings.max_memory is not None:
        budgets = {int(k) if k.isdigit() else k: parse_size(v) for k, v in settings.max_memory.items()}
    folder = Path(settings.offload_folder) if settings.offload_folder is not None else None
    return Placement(settings.device_map or device_map, budgets, folder)


EFFECT_SHARE = 0.5  # the logit threshold is at most this share of the adapters' own effect


@dataclass(frozen=True)
class EndToEnd:
    """What the end-to-end check compares: the candidate release against PEFT's base + adapters.

    `adapters` are (folder, manifest weight); `limits` the dtype's thresholds, of which those the
    manifest sets (`fixed`) are used as given; `combine` makes the reference PEFT's
    add_weighted_adapter of the adapters; `embedding_rows` resizes the base's vocabulary first.
    """

    candidate: Path
    base: Path
    adapters: list[tuple[Path, float]]
    placement: Placement
    tokenizer: Any
    prompts: list[str] | None
    new_tokens: int
    limits: dict[str, float]
    embedding_rows: int | None = None
    fixed: frozenset[str] = frozenset()
    combine: CombinePlan | None = None
    dequantized: dict[str, TensorEntry] | None = None  # the base's tensors, when it is stored quantized
    model_class: str | None = None
    output_dtype: str = "F32"  # the release's dtype, as the report names it: the ideal merge is rounded to it
    parameters: int = 0  # the release's planned parameter count (what the two float32 models take)
    layer_by_layer: bool | None = None  # `verify.layer_by_layer`: None lets choose_runner decide
    fp8: tuple[tuple[str, tuple[int, int]], ...] = ()  # an FP8 release's FP8 weights and their blocks
    fp8_ragged: bool = False  # some of them have partial edge blocks (transformers cannot dequantize them)
    processor: Path | None = None  # the processor files' folder: a vision-language base's image prompt


def check_end_to_end(report: GateReport, check: EndToEnd) -> None:
    """Record the end-to-end metrics of the candidate against PEFT's reference (with `combine`, PEFT's
    add_weighted_adapter of the adapters: an independent check of the combination).

    The max |logit diff| threshold is the dtype's, or half the adapters' own effect (the largest
    logit change between base and base + adapters) when that is smaller, so that a weak adapter
    cannot hide a broken merge under an absolute threshold; a threshold set in the manifest
    (`fixed`) is used as given.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(report, check, COMPUTE_DTYPE, dict(check.limits))


def _run(report: GateReport, check: EndToEnd, dtype: torch.dtype, limits: dict[str, float]) -> None:
    layered, why = choose_runner(check)
    report.context["runner"] = why
    if layered:
        _judge(report, _layered_runs(check), check, limits)
        return
    with check.placement.loading() as (for_reference, for_release):
        reference = reference_model(
            check.base,
            check.adapters,
            dtype,
            for_reference,
            embedding_rows=check.embedding_rows,
            combine=check.combine,
            dequantized=check.dequantized,
            model_class=check.model_class,
        )
        if check.dequantized is not None:
            report.context["reference_base"] = f"dequantized by {dequantizer(check.base, check.dequantized)}"
        loader = model_loader(check.model_class)
        if check.fp8_ragged:  # transformers refuses to dequantize partial blocks
            report.context["release_load"] = "the gate's own FP8 dequantizer (partial blocks)"
            merged = load_fp8_release(check.candidate, loader, dtype, dict(check.fp8))
        else:
            if check.fp8:
                report.context["release_load"] = "transformers FineGrainedFP8Config(dequantize=True)"
            merged = loader.from_pretrained(check.candidate, dtype=dtype, **release_loading(check, for_release)).eval()
        same_stop_ids(reference, merged)
        report.context["placement"] = check.placement.describe(reference, merged)
        _judge(report, _whole_runs(reference, merged, check), check, limits)


def release_loading(check: EndToEnd, for_release: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained's arguments for the release: an FP8 one dequantized by transformers, as it
    loads FP8 on a CPU (and here on any device, so that the figures do not depend on it)."""
    if not check.fp8:
        return for_release
    from transformers import FineGrainedFP8Config

    return {**for_release, "quantization_config": FineGrainedFP8Config(dequantize=True)}


def same_stop_ids(reference: Any, release: Any) -> None:
    """Give the reference the release's end-of-sequence ids. The greedy paths never choose one
    (generate's min_new_tokens), and the release's may include the tokenizer's EOS, added by the plan
    where the base's generation_config lacks it (a Llama 3 base and its instruct tokenizer): with the
    base's own ids, the reference could choose a token the release may not, and a correct merge
    would fail greedy_match."""
    eos = getattr(getattr(release, "generation_config", None), "eos_token_id", None)
    inner = reference.get_base_model() if hasattr(reference, "get_base_model") else reference
    for model in {id(m): m for m in (reference, inner)}.values():
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = eos


LAYERED_ENV = "MERGEKIT_LITE_LAYER_BY_LAYER"  # 1: run the check layer by layer where it can; 0: never
MEMORY_SHARE = 0.5  # layer by layer when the two float32 models would take more than this share of free memory


def choose_runner(check: EndToEnd) -> tuple[bool, str]:
    """Whether the check runs its models layer by layer (gate/streamed.py), and why, for the report.

    `verify.layer_by_layer` (else $MERGEKIT_LITE_LAYER_BY_LAYER) forces it either way; by default it
    is used when the two float32 models (4 bytes per planned parameter each) would take more than
    half of the memory available now and the models are placed on the CPU. An architecture or input
    the layered runner does not cover runs whole, with that reason.
    """
    reason = _not_layered(check)
    forced = check.layer_by_layer
    if forced is None and os.environ.get(LAYERED_ENV, "") in ("0", "1"):
        forced = os.environ[LAYERED_ENV] == "1"
    need = 2 * 4 * check.parameters
    free = available_memory()
    if forced is False:
        return False, "whole models (layer by layer is turned off)"
    if forced is None and check.placement.device_map != "cpu":
        return False, f"whole models, placed with device_map {check.placement.device_map}"
    if forced is None and (free is None or need <= MEMORY_SHARE * free):
        return False, f"whole models ({need / 2**30:.2f} GiB in float32 for both; {_gib(free)} available)"
    if reason is not None:
        return False, f"whole models: layer by layer was wanted, but {reason}"
    if forced:
        return True, "layer by layer (asked for)"
    return True, f"layer by layer ({need / 2**30:.2f} GiB in float32 for both models; {_gib(free)} available)"


def _gib(size: int | None) -> str:
    return "unknown memory" if size is None else f"{size / 2**30:.2f} GiB"


def available_memory() -> int | None:
    """The memory available to a new allocation now (Linux's MemAvailable), in bytes; None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _not_layered(check: EndToEnd) -> str | None:
    """Why the layered runner cannot run this check (None when it can)."""
    from mergekit_lite.gate.streamed import unsupported_reason

    if check.combine is not None:
        return "the reference is PEFT's add_weighted_adapter of the adapters"
    if check.dequantized is not None:
        return "the base is stored quantized"
    if check.fp8:
        return "the release is stored as FP8"
    config = json.loads((check.base / "config.json").read_text())
    rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if check.embedding_rows is not None and check.embedding_rows != rows:
        return f"the adapters resize the vocabulary ({rows} -> {check.embedding_rows} rows)"
    if (reason := unsupported_reason(config, check.model_class)) is not None:
        return reason
    if check.processor is not None and "vision_config" in config:  # the layered runner takes token ids only
        return "the image prompt of a vision-language base runs on whole models only"
    return None


@dataclass
class Runs:
    """What the four metrics are computed from: per prompt, the logits of the reference, the release and
    the base alone, the reference's greedy path (tokens and the logits each was chosen from), the
    release's greedy tokens, and the ideal merge's logits and tokens (None when it was not made)."""

    ids: list[torch.Tensor]
    how: str
    reference: list[torch.Tensor]
    release: list[torch.Tensor]
    base: list[torch.Tensor]
    reached: set[str]
    changed: set[str]
    paths: list[tuple[list[int], torch.Tensor]]
    release_tokens: list[list[int]]
    new_tokens: int
    model_class: str
    ideal: list[torch.Tensor] | None = None
    ideal_tokens: list[list[int]] | None = None
    ideal_how: str = ""
    image: ImagePrompt | None = None  # a vision-language model's image prompt (the last prompt), or why none


def _whole_runs(reference: Any, merged: Any, check: EndToEnd) -> Runs:
    """The figures of two whole models (the reference is consumed by the ideal merge). A
    vision-language model also gets the image prompt (gate/images.py), made with the base model's
    own processor and config, as the last prompt."""
    vocab = merged.get_input_embeddings().weight.shape[0]
    ids, how = prompt_ids(check.tokenizer, check.prompts, vocab, placeholder_ids(merged.config))
    extras: list[dict[str, torch.Tensor]] = [{} for _ in ids]
    image = None
    if is_vision_language(merged.config):
        image = image_prompt(check.processor, reference.get_base_model(), check.tokenizer)
        if image.ids is not None:
            ids.append(image.ids)
            extras.append(image.inputs)
            how += " + 1 image prompt"
    prompts = list(zip(ids, extras))
    with _modules_run(reference) as reached:
        ref_logits = [_forward(reference, seq, extra=x) for seq, x in prompts]
    out_logits = [_forward(merged, seq, extra=x) for seq, x in prompts]
    with reference.disable_adapter():
        base_logits = [_forward(reference, seq, extra=x) for seq, x in prompts]
    n = check.new_tokens if merged.can_generate() else 0  # a classification head: its logits are compared
    runs = Runs(
        ids,
        how,
        ref_logits,
        out_logits,
        base_logits,
        reached,
        _changed_modules(reference),
        [_reference_path(reference, seq, n, x) for seq, x in prompts],
        [_generate(merged, seq, n, x) if n else [] for seq, x in prompts],
        n,
        type(merged).__name__,
        image=image,
    )
    ideal_model, runs.ideal_how = ideal_merge(reference, check.output_dtype, dict(check.fp8))
    if ideal_model is not None:
        runs.ideal = [_forward(ideal_model, seq, extra=x) for seq, x in prompts]
        runs.ideal_tokens = [_generate(ideal_model, seq, n, x) if n else [] for seq, x in prompts]
    return runs


def _layered_runs(check: EndToEnd) -> Runs:
    """The figures of the models run layer by layer, read from their files (gate/streamed.py)."""
    from mergekit_lite.gate import streamed
    from mergekit_lite.gate.calibrate import OUTPUT_DTYPES

    ideal = OUTPUT_DTYPES.get(check.output_dtype)
    with streamed.opened(check.base, check.adapters, check.candidate, check.model_class, ideal=ideal) as models:
        config = models.release.root.config
        vocab = models.release.root.get_input_embeddings().weight.shape[0]
        ids, how = prompt_ids(check.tokenizer, check.prompts, vocab, placeholder_ids(config))
        with _modules_run(models.reference.peft) as reached:
            run = streamed.greedy(models, ids, check.new_tokens)
        paths = [(tokens, rows) for tokens, rows in zip(run.tokens["reference"], run.chosen_from["reference"])]
        runs = Runs(
            ids,
            how,
            run.logits["reference"],
            run.logits["release"],
            run.logits["base"],
            reached,
            _changed_modules(models.reference.peft),
            paths,
            run.tokens["release"],
            check.new_tokens,
            type(models.release.root).__name__,
        )
    if ideal is None:
        runs.ideal_how = f"no ideal merge for output dtype {check.output_dtype}"
    else:
        runs.ideal, runs.ideal_tokens = run.logits["ideal"], run.tokens["ideal"]
        runs.ideal_how = f"PEFT's merge of each layer in float32, rounded once to {str(ideal).removeprefix('torch.')}"
    return runs


def _judge(report: GateReport, runs: Runs, check: EndToEnd, limits: dict[str, float]) -> None:
    """The four metrics of the release against the reference, with thresholds calibrated against the
    ideal merge (gate/calibrate.py), recorded in `report`."""
    tokenizer, new_tokens = check.tokenizer, runs.new_tokens
    effect = max(float((r - b).abs().max()) for r, b in zip(runs.reference, runs.base))
    threshold_note = ""
    unreached = sorted(runs.changed - runs.reached)
    if unreached:
        report.context["modules_not_reached"] = unreached
        threshold_note = (
            f"; {len(unreached)} changed module(s) never ran on these prompts ({', '.join(unreached[:3])}"
            f"{', ...' if len(unreached) > 3 else ''}): only the per-tensor algebra check covers them"
        )
    image_note = _image_note(report, runs)
    if effect == 0:  # nothing to scale by: the comparison covers only what the adapters left unchanged
        threshold_note += "; the adapters change none of these logits"
    elif "max_abs_logit_diff" not in check.fixed and EFFECT_SHARE * effect < limits["max_abs_logit_diff"]:
        limits["max_abs_logit_diff"] = EFFECT_SHARE * effect
        threshold_note = f" (threshold: {EFFECT_SHARE:g} x the adapters' effect)" + threshold_note
    tie = 2 * limits["max_abs_logit_diff"]  # before calibration: a loosened threshold widens no tie
    figures = _compare(runs.reference, runs.release, tie)
    figures["greedy_match"], first_diff = _greedy(
        runs.paths, runs.release_tokens, new_tokens, tokenizer=tokenizer, tie=tie
    )
    report.context.update(
        {
            "prompts": runs.how,
            "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
            "adapter_effect_max_abs_logit_diff": effect,
            "tie_margin": tie,
            "model_class": runs.model_class,
        }
    )
    ideal, vs_ideal = _against_ideal(report, runs, tie)
    limits, rules = calibrated(limits, ideal, check.fixed)
    detail = {
        "max_abs_logit_diff": f"worst: prompt {_named(figures.pop('worst_prompt'), runs)}; base vs reference: "
        f"{effect:.3g}{threshold_note}{image_note}",
        "mean_kl": "KL(reference || merged), mean over positions",
        "top1_agreement": f"share of positions with the same argmax (ties within {tie:.3g} agree)",
        "greedy_match": first_diff or f"share of prompts whose {new_tokens} greedy tokens agree (up to a tie)",
    }
    for metric in ("max_abs_logit_diff", "mean_kl", "top1_agreement", "greedy_match"):
        value, limit = figures[metric], limits[metric]
        if metric in ideal:
            versus = f", release vs ideal: {vs_ideal[metric]:.4g}" if metric in vs_ideal else ""
            detail[metric] += f"; ideal merge: {ideal[metric]:.4g}{versus}; threshold: {rules[metric]}"
        report.add(
            "end_to_end", metric, within(metric, value, limit), figure=value, threshold=limit, detail=detail[metric]
        )


def _image_note(report: GateReport, runs: Runs) -> str:
    """The image prompt, or why a vision-language model has none, recorded in the report's context;
    the same in words for the logit row (and so the model card)."""
    if runs.image is None:
        return ""
    if runs.image.ids is None:
        report.context["image_prompt"] = {"used": False, "reason": runs.image.reason}
        return f"; no image prompt: {runs.image.reason}"
    report.context["image_prompt"] = {"used": True, "prompt": len(runs.ids) - 1, "how": runs.image.how}
    return f"; image prompt (prompt {len(runs.ids) - 1}): {runs.image.how}"


def _named(prompt: int, runs: Runs) -> str:
    """A prompt's number, `(the image prompt)` after it when it is that one."""
    image = runs.image is not None and runs.image.ids is not None and prompt == len(runs.ids) - 1
    return f"{prompt} (the image prompt)" if image else str(prompt)


_PLACEHOLDERS = ("image_token", "video_token", "audio_token", "vision_start", "vision_end", "boi_token", "eoi_token")


def placeholder_ids(config: Any) -> frozenset[int]:
    """The token ids a multimodal config reserves for images, video or audio (`image_token_id`, ...)."""
    found = set()
    for key, value in config.to_dict().items():
        if key.startswith(_PLACEHOLDERS) and key.endswith(("_id", "_index")) and type(value) is int:
            found.add(value)
    return frozenset(found)


def _against_ideal(report: GateReport, runs: Runs, tie: float) -> tuple[dict[str, float], dict[str, float]]:
    """The ideal merge's four figures against the reference, and the release's against the ideal
    (recorded in the report's context); empty when no ideal merge was made (the table alone then
    sets the thresholds, and the context says why)."""
    if runs.ideal is None or runs.ideal_tokens is None:
        report.context["calibration"] = {"skipped": runs.ideal_how}
        return {}, {}
    ideal = _compare(runs.reference, runs.ideal, tie)
    ideal.pop("worst_prompt")
    ideal["greedy_match"], _ = _greedy(runs.paths, runs.ideal_tokens, runs.new_tokens, tokenizer=None, tie=tie)
    vs_ideal = _compare(runs.ideal, runs.release, tie)
    vs_ideal.pop("worst_prompt")  # greedy against the ideal would need its own paths: not measured
    report.context["calibration"] = {
        "ideal": runs.ideal_how,
        "margins": dict(CALIBRATION_MARGINS),
        "ideal_vs_reference": ideal,
        "release_vs_ideal": vs_ideal,
    }
    return ideal, vs_ideal


def _input_device(model) -> torch.device:
    """Where inputs go: the embedding's device; the CPU when it is offloaded (accelerate's hooks move them on)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def _inner(model):
    """The transformers model under PEFT's wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_seq2seq(model) -> bool:
    """An encoder-decoder run with its decoder (not T5EncoderModel, whose config says encoder-decoder)."""
    import inspect

    takes_decoder = "decoder_input_ids" in inspect.signature(_inner(model).forward).parameters
    return bool(getattr(model.config, "is_encoder_decoder", False)) and takes_decoder


def _decoder_start(model) -> int:
    start = getattr(model.config, "decoder_start_token_id", None)
    return int(start if start is not None else getattr(model.config, "pad_token_id", None) or 0)


def _forward(
    model, ids: torch.Tensor, continuation: list[int] | None = None, *, extra: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Logits [positions, classes] in float64 on the CPU.

    A decoder-only model reads the prompt (then the continuation); an encoder-decoder reads the
    prompt in its encoder and, in its decoder, the start token followed by the continuation, or by
    the prompt itself without its last token when none is given (so every decoder position runs
    cross-attention over the encoded prompt). A classification head gives one row per sequence
    (or per token). `extra`: the image prompt's other inputs (pixel values, token types).
    """
    device = _input_device(model)
    inputs: dict[str, torch.Tensor]
    if _is_seq2seq(model) and not _inner(model).can_generate():  # BART's classification head: as users
        eos = getattr(model.config, "eos_token_id", None)  # run it, the ids alone, ending in EOS (it reads
        if isinstance(eos, int) and eos not in ids.tolist():  # the decoder's state there)
            ids = torch.cat([ids, torch.tensor([eos], dtype=ids.dtype)])
        inputs = {"input_ids": ids.unsqueeze(0)}
    elif _is_seq2seq(model):
        tail = continuation if continuation is not None else ids[:-1].tolist()
        decoder = torch.tensor([_decoder_start(model), *tail], dtype=ids.dtype)
        inputs = {**_encoder_inputs(model, ids), "decoder_input_ids": decoder.unsqueeze(0)}
    else:
        seq = ids if continuation is None else torch.cat([ids, torch.tensor(continuation, dtype=ids.dtype)])
        inputs = {"input_ids": seq.unsqueeze(0), **extended(extra or {}, len(ids), len(seq) - len(ids))}
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in inputs.items()})
    logits = _outputs(out)
    return logits.reshape(-1, logits.shape[-1]).to("cpu", torch.float64)


def _outputs(out) -> torch.Tensor:
    """What a model's forward is compared on: its logits; an extractive question-answering head's
    start and end logits side by side ([positions, 2]); a model without a head (feature extraction)
    its last hidden states."""
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "start_logits", None) is not None:
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.last_hidden_state


AUDIO_SEED = 0


def _encoder_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What an encoder-decoder's encoder reads: the prompt's ids, or for a speech model (Whisper,
    whose encoder takes log-mel features, `input_features`) one fixed synthetic recording: seeded
    Gaussian features of the shape its encoder takes (num_mel_bins x 2 x max_source_positions
    frames), the same for every prompt and every model, so that the encoder's LoRA runs while the
    decoder reads the prompt."""
    if getattr(model, "main_input_name", "input_ids") != "input_features":
        return {"input_ids": ids.unsqueeze(0)}
    config = model.config
    frames = 2 * int(config.max_source_positions)  # Whisper's two convolutions, the second of stride 2
    gen = torch.Generator().manual_seed(AUDIO_SEED)
    return {"input_features": torch.randn(1, int(config.num_mel_bins), frames, generator=gen)}


@contextmanager
def _modules_run(peft_model) -> Iterator[set[str]]:
    """The names (as in the adapter) of the changed modules whose forward ran inside the block."""
    reached: set[str] = set()
    handles = []
    for name, module in _changed(peft_model):
        handles.append(module.register_forward_hook(lambda *_, name=name: reached.add(name)))
    try:
        yield reached
    finally:
        for handle in handles:
            handle.remove()


def _changed(peft_model) -> list[tuple[str, torch.nn.Module]]:
    """PEFT's LoRA layers and modules_to_save wrappers, by module name without PEFT's prefix."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    found = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer | ModulesToSaveWrapper):
            found.append((name.removeprefix("base_model.model."), module))
    return found


def _changed_modules(peft_model) -> set[str]:
    return {name for name, _ in _changed(peft_model)}


def _compare(reference: list[torch.Tensor], merged: list[torch.Tensor], tie: float) -> dict[str, Any]:
    """Max |logit diff| (and where), mean KL(reference || merged), top-1 agreement up to ties."""
    worst, worst_prompt, kls, agree, total = 0.0, 0, [], 0, 0
    for i, (ref, out) in enumerate(zip(reference, merged)):
        diff = float((ref - out).abs().max())
        if diff > worst:
            worst, worst_prompt = diff, i
        log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
        agree += int(_agrees(ref, out.argmax(-1), tie).sum())
        total += ref.shape[0]
    return {
        "max_abs_logit_diff": worst,
        "worst_prompt": worst_prompt,
        "mean_kl": float(torch.cat(kls).mean().clamp_min(0)),
        "top1_agreement": agree / total,
    }


def _agrees(ref_logits: torch.Tensor, chosen: torch.Tensor, tie: float) -> torch.Tensor:
    """Per position: the chosen token is the reference's argmax, or scores within `tie` of it."""
    best = ref_logits.max(-1).values
    picked = ref_logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    return best - picked <= tie


def _reference_path(
    reference, seq: torch.Tensor, n: int, extra: dict[str, torch.Tensor] | None = None
) -> tuple[list[int], torch.Tensor]:
    """The reference's n greedy tokens after `seq`, and its logits along that path: row k holds the
    logits from which token k was chosen (what a divergence at token k is judged against)."""
    if n == 0:
        return [], torch.empty(0)
    path = _generate(reference, seq, n, extra)
    logits = _forward(reference, seq, path, extra=extra)  # an encoder-decoder's row 0 is its start token's
    start = 0 if _is_seq2seq(reference) else len(seq) - 1
    return path, logits[start : start + n]


def _greedy(
    paths: list[tuple[list[int], torch.Tensor]], tokens: list[list[int]], n: int, *, tokenizer: Any, tie: float
) -> tuple[float, str]:
    """Share of prompts whose n greedy `tokens` agree with the reference's `paths`, where a first
    divergence at a near-tie of the reference (its two choices within `tie`) counts as agreement;
    the first real divergence, described."""
    if n == 0:
        return 1.0, "no tokens requested"
    same, first = 0, ""
    for i, ((a, ref_logits), b) in enumerate(zip(paths, tokens)):
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None or bool(_agrees(ref_logits[k], torch.tensor(b[k]), tie)):
            same += 1
        elif not first:
            first = f"prompt {i} differs at token {k}"
            if tokenizer is not None:
                first += f": {tokenizer.decode(a)!r} vs {tokenizer.decode(b)!r}"
    return same / len(paths), first


def _generate(model, seq: torch.Tensor, n: int, extra: dict[str, torch.Tensor] | None = None) -> list[int]:
    """Exactly n greedy tokens (no early stop), through transformers' own generate."""
    from transformers import GenerationConfig

    if getattr(model, "main_input_name", "input_ids") == "input_features":
        return _argmax_path(model, seq, n)
    ids = seq.unsqueeze(0).to(_input_device(model))
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    with torch.no_grad():
        more = {k: v.to(ids.device) for k, v in (extra or {}).items()}
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **more)
    # an encoder-decoder's output is its decoder's: the start token, then the new tokens
    return out[0, 1:].tolist() if _is_seq2seq(model) else out[0, ids.shape[1] :].tolist()


def _argmax_path(model, seq: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens of a speech encoder-decoder, its decoder reading the start token and what it
    chose so far: Whisper's generate adds its own language, task and timestamp logic (and returns
    its tokens without the decoder's prompt), so its argmax is taken here, the same way for every
    model compared."""
    path: list[int] = []
    for _ in range(n):
        path.append(int(_forward(model, seq, path)[-1].argmax()))
    return path
