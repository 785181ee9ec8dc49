"""Issue 19, part 3: `output.gguf`. The SmolLM2 example merged with `output.gguf: bf16`: llama.cpp's
own converter (fetched by `make runtimes` into .cache/runtimes/llama.cpp) writes the GGUF into the
release, listed in SHA256SUMS and release.json, with the release's name and base model in its
metadata; the gate reads it back with transformers' GGUF loader (every tensor bit for bit, logits and
greedy tokens as the release's); a damaged GGUF fails `verify`; q8_0 passes within its bound; the
Ollama Modelfile's template renders conversations exactly as the tokenizer's chat template does; a
missing converter is refused in one line before anything is written.

The tier needing the converter is skipped when it is absent, unless MERGEKIT_LITE_RUNTIME_TESTS=1
(.ci/run fetches it and sets that, so CI never skips it).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.gate.gguf import GgufFile, check_gguf
from mergekit_lite.gate.report import GateReport
from mergekit_lite.manifest.sections import GgufSpec
from mergekit_lite.pipeline import execute, prepare, verify_release
from mergekit_lite.release.gguf import ChatShape, chat_shape, convert, find_converter, go_template
from mergekit_lite.sources.tokenizer import load_tokenizer
from mergekit_lite.tools.example import prepare as prepare_example

from helpers import write_manifest
from release_builders import copy_release, write_sha256sums

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "examples"
LLAMA_CPP = REPO / ".cache" / "runtimes" / "llama.cpp"
needs_converter = pytest.mark.skipif(
    not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file() and os.environ.get("MERGEKIT_LITE_RUNTIME_TESTS") != "1",
    reason="no llama.cpp converter: `make runtimes` fetches it (CI does)",
)
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
VERIFY = {"prompts": ["What is the capital of France?", "Name a colour."], "max_new_tokens": 4}


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, Path]:
    try:
        return prepare_example(CACHE)
    except Exception as exc:  # the example package missing is a set-up error, not a skip
        pytest.fail(f"cannot prepare the SmolLM2 example: {exc}")


def gguf_manifest(folder: Path, smollm2, gguf) -> Path:
    base, adapter = smollm2
    manifest = write_manifest(folder, base, [adapter], "bfloat16", absolute=True, verify=VERIFY)
    doc = yaml.safe_load(manifest.read_text())
    doc["output"]["gguf"] = gguf
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return manifest


@pytest.fixture(scope="module")
def release(smollm2, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    manifest = gguf_manifest(folder, smollm2, {"outtype": "bf16", "llama_cpp": str(LLAMA_CPP)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = execute(prepare(manifest))
    return manifest, result.output


def gguf_rows(report) -> dict[str, tuple[bool, object, str]]:
    return {c.name: (c.passed, c.figure, c.detail) for c in report.checks if c.group == "gguf"}


@needs_converter
def test_release_ships_a_gguf_that_is_the_release(release) -> None:
    manifest, out = release
    name = f"{out.name}-BF16.gguf"
    assert (out / name).is_file() and (out / "Modelfile").is_file()
    sums = (out / "SHA256SUMS").read_text()
    assert f"  {name}\n" in sums and "  Modelfile\n" in sums
    receipt = json.loads((out / "release.json").read_text())
    assert {name, "Modelfile"} <= {o["path"] for o in receipt["outputs"]}
    verification = json.loads((out / "verification.json").read_text())
    rows = {c["name"]: c for c in verification["checks"] if c["group"] == "gguf"}
    assert set(rows) == {
        "every tensor is the release's",
        "max_abs_logit_diff",
        "greedy_match",
        "metadata names the release and its base",
    }
    assert all(r["passed"] for r in rows.values()), rows
    assert rows["every tensor is the release's"]["detail"].endswith("tensors, bit for bit")
    assert rows["max_abs_logit_diff"]["figure"] == 0  # the same weights: the same float32 logits
    assert "gguf" in (out / "README.md").read_text()  # the card's gate table has the rows
    report = verify_release(manifest)  # `verify` reads it back again, from the published folder
    assert report.passed and gguf_rows(report)["every tensor is the release's"][0]


@needs_converter
def test_gguf_metadata_names_the_release(release) -> None:
    from gguf import GGUFReader

    _, out = release
    field = GGUFReader(str(out / f"{out.name}-BF16.gguf")).fields["general.name"]
    # the release's name, not the converter's guess from the folder it ran on (a staging folder)
    assert bytes(field.parts[field.data[0]]).decode() == out.name


@needs_converter
def test_a_damaged_gguf_fails_verify(release, tmp_path: Path) -> None:
    """The negative control: one weight byte of the GGUF changed (SHA256SUMS resealed, so integrity
    passes): the tensor row fails naming the tensor, and so would any reader's logits."""
    from gguf import GGUFReader

    manifest, out = release
    copy = copy_release(out, tmp_path / out.name)
    path = copy / f"{out.name}-BF16.gguf"
    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight")
    with open(path, "r+b") as fh:
        fh.seek(int(tensor.data_offset) + 101)  # the high byte of element 50: its sign and exponent
        byte = fh.read(1)[0]
        fh.seek(int(tensor.data_offset) + 101)
        fh.write(bytes([byte ^ 0x40]))
    write_sha256sums(copy)
    report = verify_release(manifest, against=copy)
    rows = gguf_rows(report)
    passed, figure, detail = rows["every tensor is the release's"]
    assert not passed and figure == 1 and "model.layers.0.mlp.down_proj.weight" in detail, detail
    assert {c.group for c in report.failures} <= {"gguf", "integrity"}, [c.name for c in report.failures]


@needs_converter
def test_q8_0_passes_within_its_bound_and_a_bf16_file_is_not_q8_0(release, tmp_path: Path) -> None:
    """The q8_0 rule on a real q8_0 file: the tensors pass within the bound (not bit for bit); and the
    bound is tight enough to matter: the file's tensors fail the bit-for-bit rule of bf16."""
    _, out = release
    folder = copy_release(out, tmp_path / "q8")
    spec = GgufSpec(outtype="q8_0")
    converter = find_converter(GgufSpec(llama_cpp=str(LLAMA_CPP)), REPO)
    convert(converter, folder, spec, out.name, SMOLLM2, "q8.gguf")  # a base model id, as a hub base gives
    tokenizer = load_tokenizer(folder)
    report = GateReport(dtype="BF16")
    check_gguf(report, folder, GgufFile("q8.gguf", "q8_0", out.name, SMOLLM2), tokenizer, VERIFY["prompts"], 4)
    rows = gguf_rows(report)
    assert all(passed for passed, _, _ in rows.values()), rows
    assert 0 < rows["max_abs_logit_diff"][1] <= 2.0, rows  # lossy, within the bfloat16 table
    assert rows["metadata names the release and its base"][2] == f"general.name {out.name!r}, base model {SMOLLM2!r}"
    # the controls: the bit-for-bit rule of bf16 refuses the q8_0 tensors; another base is named as such
    strict = GateReport(dtype="BF16")
    check_gguf(strict, folder, GgufFile("q8.gguf", "bf16", out.name, "org/other"), tokenizer, VERIFY["prompts"], 4)
    rows = gguf_rows(strict)
    assert not rows["every tensor is the release's"][0]
    passed, _, detail = rows["metadata names the release and its base"]
    assert not passed and f"general.base_model.0.name is {SMOLLM2!r}, not 'org/other'" in detail, detail


# --------------------------------------------------------------------------- the Ollama Modelfile


def go_render(template: str, messages: list[dict[str, str]]) -> str:
    """Go text/template semantics for what the Modelfile uses: literal text, `{{ range .Messages }}`,
    `{{ if eq .Role "x" }}` / `{{ else if eq .Role "x" }}` / `{{ end }}`, `{{ .Content }}`."""
    tokens = re.split(r"(\{\{.*?\}\})", template)
    out: list[str] = []

    def run(i: int, message: dict[str, str] | None, stop: set[str]) -> int:
        emitting = [True]
        while i < len(tokens):
            tok = tokens[i]
            action = tok[2:-2].strip() if tok.startswith("{{") else None
            if action is None:
                if all(emitting):
                    out.append(tok)
            elif action == "range .Messages":
                body = i + 1
                for m in messages:
                    i = run(body, m, {"end"})
                if not messages:
                    i = run(body, None, {"end"})
            elif action.startswith("if eq .Role"):
                emitting.append(message is not None and action.split('"')[1] == message["role"])
                taken = emitting[-1]
                i += 1
                while i < len(tokens):
                    a = tokens[i][2:-2].strip() if tokens[i].startswith("{{") else None
                    if a == "end":
                        break
                    if a is not None and a.startswith("else if eq .Role"):
                        emitting[-1] = not taken and message is not None and a.split('"')[1] == message["role"]
                        taken = taken or emitting[-1]
                    elif a == ".Content":
                        if all(emitting):
                            out.append(message["content"])
                    elif a is None and all(emitting):
                        out.append(tokens[i])
                    i += 1
                emitting.pop()
            elif action == ".Content":
                out.append(message["content"])
            elif action in stop:
                return i
            i += 1
        return i

    run(0, None, set())
    return "".join(out)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello!\nHow are you?"}],
    [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
    ],
]


def test_modelfile_template_renders_as_the_chat_template(smollm2, tmp_path: Path) -> None:
    """SmolLM2's ChatML template (with its default system prompt) as an Ollama TEMPLATE + SYSTEM: for
    conversations the derivation never saw, Go's rendering (with Ollama's default system message
    inserted) equals transformers' apply_chat_template."""
    from mergekit_lite.release.gguf import write_modelfile

    base, _ = smollm2
    tokenizer = load_tokenizer(base)
    (tmp_path / "generation_config.json").write_text((base / "generation_config.json").read_text())
    text = write_modelfile(tmp_path, "x.gguf", tokenizer).read_text()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S).group(1)
    assert system.startswith("You are a helpful AI assistant named SmolLM")
    assert 'PARAMETER stop "<|im_end|>"' in text and text.startswith("# Ollama") and "FROM ./x.gguf" in text
    for messages in CONVERSATIONS:
        given = messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}, *messages]
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert go_render(template, given) == expected


def test_a_template_of_another_shape_gets_no_template(smollm2, tmp_path: Path) -> None:
    """A Jinja template that is not per-message blocks (it numbers the turns) is not translated: the
    Modelfile says Ollama uses the GGUF's stored template; and a shape that would render differently
    is never written (the derivation's own check)."""
    from mergekit_lite.release.gguf import write_modelfile

    base, _ = smollm2
    tokenizer = load_tokenizer(base)
    tokenizer.chat_template = "{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n{% endfor %}"
    assert chat_shape(tokenizer) is None
    text = write_modelfile(tmp_path, "x.gguf", tokenizer).read_text()
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and "tokenizer.chat_template" in text
    wrong = ChatShape({"system": ("", ""), "user": ("U:", "\n"), "assistant": ("A:", "\n")}, "A:", "", "")
    assert go_template(wrong) is not None  # the writer itself would write it: the check above is what stops it


# --------------------------------------------------------------------------- refusals


def test_missing_converter_is_refused_before_anything_is_written(smollm2, tmp_path: Path) -> None:
    manifest = gguf_manifest(tmp_path, smollm2, {"outtype": "bf16", "llama_cpp": str(tmp_path / "nowhere")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, ["merge", str(manifest)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: `output.gguf`: no llama.cpp `convert_hf_to_gguf.py` in `{tmp_path / 'nowhere'}` "
        "(`output.gguf.llama_cpp`); `make runtimes` fetches llama.cpp's converter into .cache/runtimes/llama.cpp; "
        "or set `output.gguf.llama_cpp` (or $MERGEKIT_LITE_LLAMA_CPP) to a llama.cpp checkout"
    )
    assert not (tmp_path / "out").exists()


def test_unknown_outtype_is_refused(smollm2, tmp_path: Path) -> None:
    manifest = gguf_manifest(tmp_path, smollm2, "q4_k_m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, ["plan", str(manifest)])
    assert result.exit_code == 2, result.output
    assert "output.gguf" in result.stderr and "q4_k_m" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_short_form_names_the_outtype(smollm2, tmp_path: Path) -> None:
    from mergekit_lite.manifest.load import load_manifest

    manifest = gguf_manifest(tmp_path, smollm2, "q8_0")
    assert load_manifest(manifest).manifest.output.gguf == GgufSpec(outtype="q8_0")
