"""Issue 19, part 2: `verify.runtimes: [llama.cpp]`, the release in llama.cpp's own C++ runtime.

The release converted to a float32 GGUF by llama.cpp's converter and run by llama-cpp-python
(`make runtimes` builds it once from its source distribution and caches it outside the clone) gives
transformers 5's logits and greedy tokens, on a tiny Llama and on the SmolLM2 release, whose shipped
`output.gguf` file is run too. Seeded defects llama.cpp reads on its own fail the check naming them:
a wrong end-of-sequence id, a damaged shipped GGUF, a tokenizer llama.cpp's converter does not know. A RoPE value changed in the transformers 4 layout only
is not one of them (the converter reads `rope_parameters` first): the packaging check catches it. A
runtime that is not there is refused in one line before anything is written.

The tier needing llama-cpp-python is skipped when it is absent, unless MERGEKIT_LITE_RUNTIME_TESTS=1
(.ci/run builds it with `make runtimes` and sets that, so CI never skips it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite import run_merge
from mergekit_lite.cli import main
from mergekit_lite.errors import InputError
from mergekit_lite.gate import llama_cpp as llama_cpp_module
from mergekit_lite.gate.llama_cpp import ENV, check_llama_cpp, find_llama_cpp
from mergekit_lite.gate.report import GateReport
from mergekit_lite.pipeline import GateFailed, execute, prepare, verify_release
from mergekit_lite.sources.tokenizer import load_tokenizer
from mergekit_lite.tools.example import prepare as prepare_example

from builders import save_base
from release_builders import (
    build_adapter,
    build_chat_base,
    build_tokenizer,
    copy_release,
    write_manifest,
    write_sha256sums,
)

REPO = Path(__file__).resolve().parent.parent
CONVERTER = REPO / ".cache" / "runtimes" / "llama.cpp" / "convert_hf_to_gguf.py"


def _available() -> bool:
    try:
        find_llama_cpp(CONVERTER)
    except InputError:
        return False
    return CONVERTER.is_file()


needs_llama_cpp = pytest.mark.skipif(
    not _available() and os.environ.get("MERGEKIT_LITE_RUNTIME_TESTS") != "1",
    reason="no llama-cpp-python or converter: `make runtimes` builds them (CI does)",
)
RUNTIMES = {"max_new_tokens": 4, "runtimes": ["llama.cpp"]}
PROMPTS = ["What is the capital of France?", "Name a colour."]


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, Path]:
    try:
        return prepare_example(REPO / ".cache" / "examples")
    except Exception as exc:  # the example package missing is a set-up error, not a skip
        pytest.fail(f"cannot prepare the SmolLM2 example: {exc}")


def tiny_base(out: Path, tokenizer_folder: Path) -> Path:
    """A tiny Llama with SmolLM2's tokenizer (a BPE pre-tokenizer llama.cpp's converter knows)."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    generation = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return save_base(config, out, seed=0, generation_config=generation, tokenizer=tokenizer)


def merge(manifest: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_merge(manifest)


@pytest.fixture(scope="module")
def release(smollm2, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama-cpp")
    base = tiny_base(root / "base", smollm2[0])
    adapter = build_adapter(base, root / "adapter", seed=5, r=4, lora_alpha=8, target_modules="all-linear")
    manifest = write_manifest(root, base, [adapter], "float32", verify=RUNTIMES)
    return manifest, merge(manifest)


def rows(report_or_doc) -> dict[str, dict]:
    checks = report_or_doc["checks"] if isinstance(report_or_doc, dict) else [c.__dict__ for c in report_or_doc.checks]
    return {c["name"]: c for c in checks if c["group"] == "runtimes"}


@needs_llama_cpp
def test_llama_cpp_runs_the_release_as_transformers_does(release) -> None:
    _, out = release
    doc = json.loads((out / "verification.json").read_text())
    checks = rows(doc)
    assert set(checks) == {
        "llama.cpp: max_abs_logit_diff",
        "llama.cpp: greedy_match",
        "llama.cpp: stops where transformers does",
    }
    assert all(c["passed"] for c in checks.values()), checks
    figure = checks["llama.cpp: max_abs_logit_diff"]["figure"]
    assert figure < 1e-4, figure  # float32 both (the KV cache too): summation order only
    assert checks["llama.cpp: greedy_match"]["figure"] == 1.0
    assert "2 '<|im_end|>'" in checks["llama.cpp: stops where transformers does"]["detail"]
    assert doc["context"]["runtimes"]["llama.cpp"]["llama-cpp-python"] == llama_cpp_module.VERSION
    assert "llama.cpp: max_abs_logit_diff" in (out / "README.md").read_text()  # the card's gate table
    print(f"\nllama.cpp, tiny Llama: max |logit diff| {figure:.3g}")


def _edit(folder: Path, name: str, edit) -> None:
    path = folder / name
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=2))
    write_sha256sums(folder)


@needs_llama_cpp
def test_a_wrong_eos_id_fails_the_stop_row(release, tmp_path: Path) -> None:
    """generation_config.json's eos_token_id made a text token's: transformers stops there, llama.cpp
    (which takes its end-of-sequence tokens from the tokenizer) does not. Its logits still agree."""
    manifest, out = release
    candidate = copy_release(out, tmp_path / "candidate")
    _edit(candidate, "generation_config.json", lambda doc: doc.__setitem__("eos_token_id", 504))
    report = verify_release(manifest, against=candidate)
    checks = rows(report)
    stop = checks["llama.cpp: stops where transformers does"]
    assert not stop["passed"] and "transformers stops at 504" in stop["detail"], stop
    assert "llama.cpp does not" in stop["detail"]
    assert checks["llama.cpp: max_abs_logit_diff"]["passed"]


@needs_llama_cpp
def test_a_rope_value_in_the_v4_layout_only_is_not_what_llama_cpp_reads(release, tmp_path: Path) -> None:
    """The converter takes rope_theta from `rope_parameters` first (under transformers 4.57 as under 5),
    so this defect does not reach llama.cpp: its rows pass. The packaging check is what catches it."""
    manifest, out = release
    candidate = copy_release(out, tmp_path / "candidate")
    _edit(candidate, "config.json", lambda doc: doc.__setitem__("rope_theta", 10.0))
    report = verify_release(manifest, against=candidate)
    failed = {f"{c.group}: {c.name}" for c in report.failures}
    assert "packaging: config.json: transformers 4 keys agree with v5's" in failed, failed
    assert all(c["passed"] for c in rows(report).values()), rows(report)


@needs_llama_cpp
def test_a_tokenizer_the_converter_does_not_know_fails_naming_it(tmp_path: Path) -> None:
    base = build_chat_base(tmp_path / "base", build_tokenizer())  # a BPE pre-tokenizer llama.cpp has no hash for
    adapter = build_adapter(base, tmp_path / "adapter", seed=5, r=4, lora_alpha=8, target_modules="all-linear")
    manifest = write_manifest(tmp_path, base, [adapter], "float32", verify=RUNTIMES)
    with warnings.catch_warnings(), pytest.raises(GateFailed) as rejected:
        warnings.simplefilter("ignore")
        execute(prepare(manifest))
    report = rejected.value.report
    assert {c.group for c in report.failures} == {"runtimes"}, [c.name for c in report.failures]
    assert "BPE pre-tokenizer was not recognized" in report.failures[0].detail, report.failures[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def smollm2_release(smollm2, tmp_path_factory) -> Path:
    """The SmolLM2 example merged (bf16) with `output.gguf: bf16`; its gate is the test's own call."""
    base, adapter = smollm2
    folder = tmp_path_factory.mktemp("smollm2-llama-cpp")
    manifest = write_manifest(folder, base, [adapter], "bfloat16", verify={"enabled": False})
    doc = yaml.safe_load(manifest.read_text())
    doc["output"]["gguf"] = {"outtype": "bf16", "llama_cpp": str(CONVERTER.parent)}
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return merge(manifest)


def smollm2_rows(folder: Path, gguf: str) -> dict[str, dict]:
    report = GateReport(dtype="BF16")
    tokenizer = load_tokenizer(folder)
    check_llama_cpp(report, folder, tokenizer, PROMPTS, 4, find_llama_cpp(CONVERTER), (gguf, "bf16"))
    return rows(report)


@needs_llama_cpp
def test_smollm2_release_and_its_gguf_run_in_llama_cpp(smollm2_release) -> None:
    gguf = f"{smollm2_release.name}-BF16.gguf"
    checks = smollm2_rows(smollm2_release, gguf)
    assert all(c["passed"] for c in checks.values()), checks
    figure = checks["llama.cpp: max_abs_logit_diff"]["figure"]
    assert figure < 1e-3 and checks["llama.cpp: greedy_match"]["figure"] == 1.0, checks
    shipped = checks[f"llama.cpp, {gguf}: max_abs_logit_diff"]
    assert shipped["threshold"] == 2.0  # the bfloat16 table: llama.cpp computes in the file's precision
    print(f"\nllama.cpp, SmolLM2: f32 max |logit diff| {figure:.3g}; shipped bf16 file {shipped['figure']:.3g}")
    print(checks[f"llama.cpp, {gguf}: greedy_match"], checks["llama.cpp: stops where transformers does"])


@needs_llama_cpp
def test_a_damaged_shipped_gguf_fails_in_llama_cpp(smollm2_release, tmp_path: Path) -> None:
    """The negative control of the shipped file: one weight byte of it changed; llama.cpp's logits on
    it fail the shipped file's rows (run as check_llama_cpp runs it, without converting afresh)."""
    from gguf import GGUFReader

    from mergekit_lite.gate.runtimes import _compare, _release_and_prompts
    from mergekit_lite.gate.tolerances import TOLERANCES

    gguf = tmp_path / f"{smollm2_release.name}-BF16.gguf"
    gguf.write_bytes((smollm2_release / gguf.name).read_bytes())
    tensor = next(t for t in GGUFReader(str(gguf)).tensors if t.name == "blk.0.ffn_down.weight")
    with open(gguf, "r+b") as fh:
        fh.seek(int(tensor.data_offset) + 101)  # the high byte of element 50: its sign and exponent
        byte = fh.read(1)[0]
        fh.seek(int(tensor.data_offset) + 101)
        fh.write(bytes([byte ^ 0x40]))
    model, ids, _ = _release_and_prompts(smollm2_release, load_tokenizer(smollm2_release), PROMPTS)
    report = GateReport(dtype="BF16")
    theirs = llama_cpp_module._run_worker(find_llama_cpp(CONVERTER), gguf, ids, 4, [2], f32_cache=False)
    _compare(report, "damaged", model, ids, theirs, 4, limits=TOLERANCES["BF16"])
    # the control is the test above: the file as shipped passes these rows (0.37 of 2.0)
    assert not rows(report)["damaged: max_abs_logit_diff"]["passed"], rows(report)


# --------------------------------------------------------------------------- not installed


def test_llama_cpp_missing_is_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    base = build_chat_base(tmp_path / "base", build_tokenizer())
    adapter = build_adapter(base, tmp_path / "adapter", seed=5, r=4, lora_alpha=8, target_modules="all-linear")
    m = write_manifest(tmp_path / "job", base, [adapter], "float32", verify=RUNTIMES)
    converter = tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"  # found, so the runtime is what is missing
    converter.parent.mkdir()
    converter.write_text("")
    monkeypatch.setenv("MERGEKIT_LITE_LLAMA_CPP", str(converter.parent))
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    result = CliRunner().invoke(main, ["merge", str(m)])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: `verify.runtimes: [llama.cpp]`: no `llama_cpp` in"), line
    assert "pip install 'mergekit-lite[llama-cpp]'" in line and "make runtimes" in line
    # none installed here and no cached build: said so, with what to install
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    result = CliRunner().invoke(main, ["merge", str(m)])
    assert result.exit_code == 2, result.output
    assert "llama-cpp-python is not installed; `pip install 'mergekit-lite[llama-cpp]'`" in result.stderr
    # and without llama.cpp's converter (needed to make the GGUF it runs)
    monkeypatch.setenv("MERGEKIT_LITE_LLAMA_CPP", str(tmp_path / "no-converter"))
    result = CliRunner().invoke(main, ["merge", str(m)])
    assert result.exit_code == 2 and "`verify.runtimes: [llama.cpp]`: no llama.cpp `convert_hf_to_gguf.py`" in (
        result.stderr
    ), result.output
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["manifest.yaml"]
