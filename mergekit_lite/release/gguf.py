"""`output.gguf`: the verified release converted to GGUF by llama.cpp's own converter, and an Ollama
Modelfile for it.

The converter is llama.cpp's `convert_hf_to_gguf.py`, run as users run it (a subprocess of this
Python, with the llama.cpp folder's own `gguf-py` first on its path), found where users have it: the
manifest's `output.gguf.llama_cpp`, $MERGEKIT_LITE_LLAMA_CPP, `.cache/runtimes/llama.cpp` (what
`make runtimes` fetches: the converter from llama-cpp-python's source distribution), or
`convert_hf_to_gguf.py` on PATH. It is looked for at plan time, so a missing one is refused before
anything is written. The GGUF's metadata name and base model are the release's (the card's name and
`base_model`), passed with the converter's `--metadata` override, not the folder name it would guess.

The Modelfile says `FROM` the GGUF file, the chat template as an Ollama (Go) template when the
tokenizer's Jinja template is a concatenation of per-message blocks (derived from renderings of the
template itself and accepted only when re-rendering test conversations gives the same text), the
template's default system prompt, and a `stop` for each end-of-sequence token. A template of another
shape is left out: Ollama then uses the one the converter stored in the GGUF (`tokenizer.chat_template`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_lite.errors import InputError, MergekitError
from mergekit_lite.manifest.sections import GgufSpec
from mergekit_lite.sources.llama_cpp import run_converter

ENV = "MERGEKIT_LITE_LLAMA_CPP"
DEFAULT_FOLDER = Path(".cache/runtimes/llama.cpp")
SCRIPT = "convert_hf_to_gguf.py"
HOW_TO_GET = (
    f"`make runtimes` fetches llama.cpp's converter into {DEFAULT_FOLDER}; or set `output.gguf.llama_cpp` "
    f"(or ${ENV}) to a llama.cpp checkout"
)


@dataclass(frozen=True)
class Converter:
    """llama.cpp's convert_hf_to_gguf.py, and the folder whose gguf-py it imports (if it has one)."""

    script: Path

    @property
    def folder(self) -> Path:
        return self.script.parent


def find_converter(spec: GgufSpec, root: Path, what: str = "output.gguf") -> Converter:
    """The converter `spec` asks for, or an InputError saying where it was looked for and how to get it.

    `root` is the manifest's folder (a relative `llama_cpp` is taken from there); `what` is the manifest
    key that needs it, for the error (`verify.runtimes: [llama.cpp]` needs it too)."""
    if spec.llama_cpp is not None:
        folder = Path(spec.llama_cpp).expanduser()
        places = [(root / folder if not folder.is_absolute() else folder, "`output.gguf.llama_cpp`")]
    elif os.environ.get(ENV):
        places = [(Path(os.environ[ENV]).expanduser(), f"${ENV}")]
    else:
        places = [(DEFAULT_FOLDER.absolute(), "the default")]
        if on_path := shutil.which(SCRIPT):
            places.append((Path(on_path).resolve().parent, "PATH"))
    for folder, _ in places:
        if (folder / SCRIPT).is_file():
            _check_requirements(folder / SCRIPT, what)
            return Converter((folder / SCRIPT).resolve())
    folder, said = places[0]
    raise InputError(f"`{what}`: no llama.cpp `{SCRIPT}` in `{folder}` ({said}); {HOW_TO_GET}")


def _check_requirements(script: Path, what: str) -> None:
    """What the converter (at `script`) and the gate's read-back import beyond this package's own
    dependencies, refused by name if absent."""
    # sentencepiece: the converter imports it for every model; gguf: transformers reads the file back with it
    missing = [name for name in ("sentencepiece", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(
            f"`{what}`: llama.cpp's converter needs {', '.join(missing)}, not installed here; "
            "`pip install 'mergekit-lite[gguf]'`"
        )


def gguf_name(release_name: str, spec: GgufSpec) -> str:
    """The GGUF file's name in the release: `<release>-<OUTTYPE>.gguf` (llama.cpp's naming)."""
    return f"{release_name}-{spec.outtype.upper()}.gguf"


def convert(converter: Converter, folder: Path, spec: GgufSpec, name: str, base_id: str | None, file_name: str) -> Path:
    """Run the converter on the release in `folder`; the GGUF file is written there as `file_name`.

    A failed conversion raises MergekitError with the converter's last line (the release is then not
    published)."""
    metadata: dict[str, Any] = {"general.name": name}
    if base_id:
        metadata["general.base_models"] = [{"name": base_id, "repo_url": f"https://huggingface.co/{base_id}"}]
    out = folder / file_name
    with tempfile.TemporaryDirectory(prefix="mergekit-gguf-") as tmp:
        override = Path(tmp) / "metadata.json"
        override.write_text(json.dumps(metadata), encoding="utf-8")
        options = ["--outtype", spec.outtype, "--metadata", str(override)]
        failed = run_converter(converter.script, folder, out, options, cwd=Path(tmp))
    if failed is not None:
        out.unlink(missing_ok=True)
        raise MergekitError(f"llama.cpp's {SCRIPT} could not convert the release: {failed}")
    return out


# --------------------------------------------------------------------------- the Ollama Modelfile

_MARKS = {"system": "\x02SYSTEM-TEXT\x03", "user": "\x02USER-TEXT\x03", "assistant": "\x02ASSISTANT-TEXT\x03"}


@dataclass(frozen=True)
class ChatShape:
    """A chat template as per-message blocks: (prefix, suffix) per role, the generation prompt, the
    default system prompt ('' when none) and whether a BOS text leads every rendering."""

    blocks: dict[str, tuple[str, str]]
    generation: str
    default_system: str
    bos: str

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt this shape gives for `messages` (with the generation prompt), as Ollama would."""
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = "".join(self.blocks[m["role"]][0] + m["content"] + self.blocks[m["role"]][1] for m in messages)
        return self.bos + text + self.generation


def chat_shape(tokenizer: Any) -> ChatShape | None:
    """The template's per-message shape, or None when it is not one (checked on test conversations)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def msg(role: str) -> dict[str, str]:
        return {"role": role, "content": _MARKS[role]}

    try:
        one = render([msg("system")])
        two = render([msg("system"), msg("user")])
        three = render([msg("system"), msg("user"), msg("assistant")])
        asked = render([msg("system"), msg("user")], generation=True)
        alone = render([msg("user")])
    except Exception:  # a template that refuses these conversations has another shape
        return None
    if not (two.startswith(one) and three.startswith(two) and asked.startswith(two)):
        return None
    # a BOS text that leads only the first block is the runtime's to add (llama.cpp adds it from the
    # GGUF's add_bos_token); one that starts every block (ChatML's <|im_start|> as BOS) is the template's
    bos = getattr(tokenizer, "bos_token", None) or ""
    bos = bos if bos and one.startswith(bos) and not two[len(one) :].startswith(bos) else ""
    pieces = {"system": one[len(bos) :], "user": two[len(one) :], "assistant": three[len(two) :]}
    blocks = {}
    for role, piece in pieces.items():
        if piece.count(_MARKS[role]) != 1:
            return None
        prefix, _, suffix = piece.partition(_MARKS[role])
        blocks[role] = (prefix, suffix)
    default = ""
    user_block = blocks["user"][0] + _MARKS["user"] + blocks["user"][1]
    head = alone[len(bos) :].removesuffix(user_block) if alone.endswith(user_block) else None
    if head is None:
        return None
    if head:
        sys_prefix, sys_suffix = blocks["system"]
        if not (head.startswith(sys_prefix) and head.endswith(sys_suffix)):
            return None
        default = head[len(sys_prefix) : len(head) - len(sys_suffix)]
    shape = ChatShape(blocks, asked[len(two) :], default, bos)
    return shape if _agrees(shape, render) else None


def _agrees(shape: ChatShape, render: Any) -> bool:
    """Whether the shape re-renders test conversations (with and without a system prompt, several
    turns, text with newlines) exactly as the template does."""
    tests = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "user", "content": "Line one\nline two"},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "And then?"},
        ],
    ]
    try:
        return all(shape.render(t) == render(t, True) for t in tests)
    except Exception:
        return False


def go_template(shape: ChatShape) -> str | None:
    """The shape as an Ollama (Go text/template) TEMPLATE, or None where its text cannot be written
    literally (a `{{` or a triple quote in it). No `{{-` trimming: every newline of the blocks is kept."""
    texts = [shape.generation, *(t for pair in shape.blocks.values() for t in pair)]
    if any("{{" in t or '"""' in t for t in texts):
        return None
    branches = []
    for i, (role, (prefix, suffix)) in enumerate(shape.blocks.items()):
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{prefix}{{{{ .Content }}}}{suffix}')
    return "{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + shape.generation


def stop_tokens(tokenizer: Any, generation_config: dict[str, Any]) -> list[str]:
    """The end-of-sequence tokens as text: generation_config's `eos_token_id`(s) and the tokenizer's EOS."""
    ids = generation_config.get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    found = [tokenizer.convert_ids_to_tokens(i) for i in ids if isinstance(i, int)] if tokenizer is not None else []
    if tokenizer is not None and getattr(tokenizer, "eos_token", None):
        found.append(tokenizer.eos_token)
    out: list[str] = []
    for token in found:
        if isinstance(token, str) and token and '"' not in token and token not in out:
            out.append(token)
    return out


def write_modelfile(folder: Path, gguf_file: str, tokenizer: Any) -> Path:
    """`Modelfile` beside the GGUF file (see the module's docstring for what it holds)."""
    generation = folder / "generation_config.json"
    config = json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else {}
    shape = chat_shape(tokenizer)
    template = go_template(shape) if shape is not None else None
    lines = ["# Ollama: `ollama create <name> -f Modelfile` in this folder", f"FROM ./{gguf_file}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
        if shape is not None and shape.default_system and '"""' not in shape.default_system:
            lines.append(f'SYSTEM """{shape.default_system}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF (tokenizer.chat_template)")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(tokenizer, config)]
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
