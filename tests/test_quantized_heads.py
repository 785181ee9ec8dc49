"""Quantized bases that are not causal LMs: a Llama sequence classifier and a BART seq2seq model,
quantized to nf4 by transformers + bitsandbytes on CPU, with a PEFT adapter (SEQ_CLS with
modules_to_save `score`; SEQ_2_SEQ_LM all-linear), merged in float32 through the pipeline.

The gate's end-to-end reference dequantizes the base with bitsandbytes (gate/dequantized.py) in the
release's own class: it used to load every quantized base as a causal LM, which gave a classifier a
random lm_head (the check then could not run) and BART only its decoder.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from mergekit_lite.pipeline import execute, prepare

from helpers import write_manifest

pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

REL = 1e-5
CLASSES = {"llama_seq_cls": "LlamaForSequenceClassification", "bart": "BartForConditionalGeneration"}


def _config(kind: str):
    from transformers import BartConfig, LlamaConfig

    if kind == "bart":
        return BartConfig(
            vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0,
    )  # fmt: skip


class Built:
    """For one kind: the bfloat16 base, its nf4 copy, the adapter, and the float32 release + report."""

    def __init__(self, kind: str, root: Path) -> None:
        import transformers
        from peft import LoraConfig, get_peft_model
        from transformers import BitsAndBytesConfig

        self.cls = getattr(transformers, CLASSES[kind])
        root.mkdir(parents=True)
        self.dense, self.nf4, self.adapter = root / "dense", root / "nf4", root / "adapter"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = self.cls(_config(kind)).to(torch.bfloat16)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for param in model.parameters():
                    if param.ndim == 1:
                        param.add_(0.1 * torch.randn(param.shape, generator=gen).to(param.dtype))
            model.save_pretrained(self.dense)
            quant = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
            self.cls.from_pretrained(
                self.dense, quantization_config=quant, dtype=torch.bfloat16, device_map="cpu"
            ).save_pretrained(self.nf4)
            task = "SEQ_CLS" if kind == "llama_seq_cls" else "SEQ_2_SEQ_LM"
            torch.manual_seed(1)
            config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=task, init_lora_weights=False)
            peft_model = get_peft_model(self.cls.from_pretrained(self.dense), config)
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if ".modules_to_save." in name:  # the trained head: changed too
                        param.add_(0.5 * torch.randn(param.shape, generator=gen))
            peft_model.save_pretrained(self.adapter)
        manifest = write_manifest(root / "merge", self.nf4, [self.adapter], "float32", verify={"max_new_tokens": 4})
        result = execute(prepare(manifest))
        self.release, self.report = result.output, result.report.to_dict()

    def reference(self):
        """PeftModel on the base as transformers + bitsandbytes load and dequantize it, in float32."""
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = self.cls.from_pretrained(self.nf4, device_map="cpu")
            base.dequantize()
            return PeftModel.from_pretrained(base.to(torch.float32), self.adapter).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("quantized-heads")
    return {kind: Built(kind, root / kind) for kind in CLASSES}


def _inputs(model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 90, (2, 9), generator=gen)
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, 90, (2, 5), generator=gen)}
    return {"input_ids": ids}


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((ours - ref).abs().max()) <= REL * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_release_of_a_quantized_non_causal_base_matches_peft(kind: str, built: dict[str, Built]) -> None:
    """The gate passed with the reference dequantized by bitsandbytes in the release's class; the
    release's fp32 logits (class logits for the classifier) equal PeftModel's on the dequantized
    base within 1e-5 relative; the dequantized base alone does not (negative control)."""
    b = built[kind]
    failed = [f"{c['group']}/{c['name']}: {c['detail']}" for c in b.report["checks"] if not c["passed"]]
    assert b.report["passed"], failed
    assert b.report["context"]["model_class"] == CLASSES[kind]
    assert b.report["context"]["reference_base"].startswith("dequantized by bitsandbytes")
    assert "end_to_end" not in b.report["skipped"]

    reference = b.reference()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = b.cls.from_pretrained(b.release, dtype=torch.float32).eval()
    inputs = _inputs(merged)
    with torch.no_grad():
        ref = reference(**inputs).logits.double()
        ours = merged(**inputs).logits.double()
        with reference.disable_adapter():
            base = reference(**inputs).logits.double()
    assert ours.shape == ref.shape == base.shape
    assert _close(ours, ref), f"max |diff| {float((ours - ref).abs().max()):.3g}"
    assert not _close(base, ref), "negative control: the base without the adapter matches base + adapter"


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_the_quantized_reference_is_built_in_the_release_class(
    kind: str, built: dict[str, Built], tmp_path: Path
) -> None:
    """gate/dequantized.py builds the release's class (as a causal LM, the classifier's head is a
    random lm_head and BART is only its decoder: control); and the end-to-end check alone fails a
    candidate that is the dequantized base without the adapter (the clean release passes it)."""
    from mergekit_lite.gate.dequantized import dequantized_base
    from mergekit_lite.gate.endtoend import EndToEnd, Placement, check_end_to_end
    from mergekit_lite.gate.report import GateReport
    from mergekit_lite.gate.tolerances import thresholds
    from mergekit_lite.sources.checkpoint import read_checkpoint

    b = built[kind]
    tensors = read_checkpoint(b.nf4).tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = dequantized_base(b.nf4, tensors, torch.float32, {}, CLASSES[kind])
        causal, _ = dequantized_base(b.nf4, tensors, torch.float32, {})
    assert type(model).__name__ == CLASSES[kind]
    assert type(causal).__name__ != CLASSES[kind]

    unmerged = tmp_path / "unmerged"
    shutil.copytree(b.release, unmerged)
    for shard in unmerged.glob("*.safetensors"):
        shard.unlink()
    model.save_pretrained(unmerged)

    def end_to_end(candidate: Path) -> GateReport:
        check = EndToEnd(
            candidate=candidate,
            base=b.nf4,
            adapters=[(b.adapter, 1.0)],
            placement=Placement(),
            tokenizer=None,
            prompts=None,
            new_tokens=4,
            limits=thresholds("F32"),
            dequantized=tensors,
            model_class=CLASSES[kind],
        )
        report = GateReport(dtype="F32")
        check_end_to_end(report, check)
        return report

    assert not end_to_end(unmerged).passed
    assert end_to_end(b.release).passed
