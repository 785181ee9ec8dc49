"""Bad input, through the CLI: every case is exit 2 and one stderr line `error: ...` naming the
problem, no traceback, nothing written anywhere (no output, no staging, no lock, no new file
beside the manifest), and the inputs byte for byte unchanged.

Each case builds its hostile input from copies of the zoo's tiny Llama and its LoRA (never the
zoo's own folders, which other tests share), writes a manifest and runs `mergekit-lite merge`.
tests/test_manifest.py, test_stformat.py and test_cli.py cover the library-level messages and a
few CLI refusals; this corpus extends them (see CORPUS_SIZE at the bottom).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_lite.cli import main
from mergekit_lite.io.format import MAX_HEADER_BYTES

PREFIX = "base_model.model."
Q_A = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"
ST = "model.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER_ST = "adapter_model.safetensors"


# --------------------------------------------------------------------------- the rig


class Rig:
    """tmp_path/inputs holds copies of the inputs (mutated by a case); tmp_path/run the manifest."""

    def __init__(self, root: Path, zoo) -> None:
        self.root = root
        self.inputs = root / "inputs"
        self.run = root / "run"
        self.inputs.mkdir()
        self.run.mkdir()
        self.zoo = zoo
        self.marker = root / "PAYLOAD-RAN"  # created by a payload that should never run

    def base(self, name: str = "base") -> Path:
        dest = self.inputs / name
        if not dest.exists():
            shutil.copytree(self.zoo.base("llama"), dest)
        return dest

    def adapter(self, name: str = "adapter") -> Path:
        dest = self.inputs / name
        if not dest.exists():
            shutil.copytree(self.zoo.adapter("llama_lora"), dest)
        return dest

    def manifest(self, base: Path | str | None = None, adapters: list | None = None, **fields) -> Path:
        """A valid manifest (the copied base and adapter, output ./out) with `fields` merged in."""
        doc: dict = {
            "base": str(self.base()) if base is None else (str(base) if isinstance(base, Path) else base),
            "adapters": adapters if adapters is not None else [str(self.adapter())],
            "output": "./out",
            "verify": {"logits": False},
            "tokenizer": "none",  # the zoo's base ships none
        }
        doc.update(fields)
        return self.text(yaml.safe_dump(doc, sort_keys=False))

    def text(self, text: str | bytes) -> Path:
        path = self.run / "manifest.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    def yaml_with(self, tail: str) -> Path:
        """A manifest whose last lines are `tail`, verbatim (for YAML-level cases)."""
        return self.text(f"base: {self.base()}\nadapters: [{self.adapter()}]\n{tail}")


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Rig], Path | str]  # returns the manifest path given to the CLI
    needle: str  # what the error line must contain


CASES: list[Case] = []


def case(case_id: str, needle: str):
    def register(build: Callable[[Rig], Path | str]) -> Callable[[Rig], Path | str]:
        CASES.append(Case(case_id, build, needle))
        return build

    return register


def simple(case_id: str, needle: str, build: Callable[[Rig], Path | str]) -> None:
    CASES.append(Case(case_id, build, needle))


# --------------------------------------------------------------------------- file surgery


def st_parts(path: Path) -> tuple[dict, bytes]:
    """(header as a dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_write(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.unlink(missing_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def st_edit(path: Path, edit: Callable[[dict], None]) -> Path:
    header, data = st_parts(path)
    edit(header)
    st_write(path, header, data)
    return path


def tensors_edit(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})


def config_edit(folder: Path, edit: Callable[[dict], None]) -> None:
    cfg = folder / "adapter_config.json"
    data = json.loads(cfg.read_text())
    edit(data)
    cfg.write_text(json.dumps(data))


def sharded_base(rig: Rig) -> Path:
    """The base split into two shards with an index, as save_pretrained writes it."""
    base = rig.base("sharded")
    tensors = load_file(base / ST)
    (base / ST).unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, base / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in members})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (base / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return base


def index_edit(rig: Rig, edit: Callable[[dict, Path], None]) -> Path:
    base = sharded_base(rig)
    index = json.loads((base / INDEX).read_text())
    edit(index, base)
    (base / INDEX).write_text(json.dumps(index))
    return rig.manifest(base=base)


def base_file(rig: Rig, make: Callable[[Path], None]) -> Path:
    """The base with model.safetensors replaced by what `make` puts at that path."""
    base = rig.base()
    (base / ST).unlink()
    make(base / ST)
    return rig.manifest(base=base)


def mutate_base(rig: Rig, mutate: Callable[[Path], None]) -> Path:
    base = rig.base()
    mutate(base / ST)
    return rig.manifest(base=base)


def mutate_adapter(rig: Rig, mutate: Callable[[Path], None]) -> Path:
    adapter = rig.adapter()
    mutate(adapter)
    return rig.manifest()


def adapter_config(rig: Rig, **changes) -> Path:
    return mutate_adapter(rig, lambda a: config_edit(a, lambda c: c.update(changes)))


def adapter_tensors(rig: Rig, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    return mutate_adapter(rig, lambda a: tensors_edit(a / ADAPTER_ST, edit))


def fifo(path: Path) -> None:
    os.mkfifo(path)


def dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(path: Path, marker: Path) -> None:
    """A PEFT-looking adapter_model.bin (real tensors) that also carries a code-running payload."""
    tensors = load_file(path.parent / ADAPTER_ST)
    torch.save({**tensors, "payload": Payload(marker)}, path)


# --------------------------------------------------------------------------- manifests

simple(
    "yaml-unclosed-flow-sequence",
    "manifest.yaml:3: YAML syntax error",
    lambda r: r.text(f"base: {r.base()}\nadapters: [{r.adapter()}\noutput: ./out\n"),
)
simple(
    "yaml-bad-indentation",
    "manifest.yaml:2: YAML syntax error",
    lambda r: r.text(f"base: {r.base()}\n  adapters: [{r.adapter()}]\noutput: ./out\n"),
)
simple(
    "yaml-tab-indentation",
    "manifest.yaml:3: YAML syntax error",
    lambda r: r.text(f"base: {r.base()}\nadapters:\n\t- {r.adapter()}\noutput: ./out\n"),
)
simple(
    "yaml-unterminated-quote",
    "YAML syntax error",
    lambda r: r.text(f'base: "{r.base()}\nadapters: [{r.adapter()}]\noutput: ./out\n'),
)
simple(
    "yaml-two-documents",
    "manifest.yaml:2: YAML syntax error",
    lambda r: r.text(f"base: {r.base()}\n---\nadapters: [{r.adapter()}]\noutput: ./out\n"),
)
simple(
    "yaml-nul-character",
    "manifest.yaml:2: YAML syntax error: character U+0000 is not allowed",
    lambda r: r.text(f"base: {r.base()}\nadapters: [{r.adapter()}\0]\noutput: ./out\n"),
)
simple(
    "manifest-not-utf8",
    "manifest.yaml:2: the manifest is not UTF-8 text (byte 0xff)",
    lambda r: r.text(b"base: ./b\nadapters: [\xff\xfe]\noutput: ./out\n"),
)
simple("empty-file", "manifest.yaml: the manifest is empty", lambda r: r.text(""))
simple("whitespace-only", "manifest.yaml: the manifest is empty", lambda r: r.text("  \n\n   \n"))
simple("comments-only", "manifest.yaml: the manifest is empty", lambda r: r.text("# base: ./b\n# output: ./o\n"))
simple("null-document", "a manifest is a YAML mapping", lambda r: r.text("~\n"))
simple("scalar-document", "a manifest is a YAML mapping", lambda r: r.text("merge everything please\n"))
simple(
    "misspelt-top-key",
    "unknown key `adaptors`; did you mean `adapters`?",
    lambda r: r.text(f"base: {r.base()}\nadaptors: [{r.adapter()}]\noutput: ./out\n"),
)
simple(
    "misspelt-output-key",
    "manifest.yaml:5: unknown key `output.max_shard`; did you mean `max_shard_size`?",
    lambda r: r.yaml_with("output:\n  path: ./out\n  max_shard: 1GB\n"),
)
simple(
    "misspelt-verify-key",
    "unknown key `verify.prompt`; did you mean `prompts`?",
    lambda r: r.manifest(verify={"prompt": ["Hello"]}),
)
simple(
    "misspelt-adapter-key",
    "unknown key `adapters[0].allow_pickles`; did you mean `allow_pickle`?",
    lambda r: r.manifest(adapters=[{"path": str(r.adapter()), "allow_pickles": True}]),
)
simple(
    "unknown-threshold-metric",
    "`verify.thresholds.top1`: Input should be 'max_abs_logit_diff'",
    lambda r: r.manifest(verify={"thresholds": {"top1": 0.9}}),
)
simple(
    "adapters-not-a-list", "`adapters`: Input should be a valid list", lambda r: r.manifest(adapters=str(r.adapter()))
)
simple(
    "base-a-number",
    "`base`: Input should be a mapping or a path string (got 42)",
    lambda r: r.text(f"base: 42\nadapters: [{r.adapter()}]\noutput: ./out\n"),
)
simple(
    "weight-a-word",
    "`adapters[0].weight`: Input should be a valid number (got 'heavy')",
    lambda r: r.manifest(adapters=[{"path": str(r.adapter()), "weight": "heavy"}]),
)
simple(
    "weight-infinite",
    "`adapters[0].weight`: Input should be a finite number",
    lambda r: r.manifest(adapters=[{"path": str(r.adapter()), "weight": float("inf")}]),
)
simple(
    "weight-nan",
    "`adapters[0].weight`: Input should be a finite number",
    lambda r: r.manifest(adapters=[{"path": str(r.adapter()), "weight": float("nan")}]),
)
simple(
    "weight-5000-digits",
    "manifest.yaml:2: cannot read value",
    lambda r: r.text(f"base: {r.base()}\nadapters: [{{path: {r.adapter()}, weight: {'9' * 5000}}}]\noutput: ./out\n"),
)
simple(
    "overwrite-an-int",
    "`output.overwrite`: Input should be a valid boolean",
    lambda r: r.manifest(output={"path": "./out", "overwrite": 1}),
)
simple(
    "allow-pickle-a-string",
    "`adapters[0].allow_pickle`: Input should be a valid boolean",
    lambda r: r.manifest(adapters=[{"path": str(r.adapter()), "allow_pickle": "yes"}]),
)
simple(
    "shard-size-a-bool",
    "`output.max_shard_size`: Input should be a valid string or a valid integer (got True)",
    lambda r: r.manifest(output={"path": "./out", "max_shard_size": True}),
)
simple(
    "shard-size-zero",
    "a shard size must be at least one byte",
    lambda r: r.manifest(output={"path": "./out", "max_shard_size": 0}),
)
simple(
    "shard-size-400-digits",
    "is not a size such as 5GB",
    lambda r: r.manifest(output={"path": "./out", "max_shard_size": "9" * 400 + "GB"}),
)
simple(
    "prompts-a-string",
    "`verify.prompts`: Input should be a valid list",
    lambda r: r.manifest(verify={"prompts": "Hello"}),
)
simple(
    "max-new-tokens-negative",
    "`verify.max_new_tokens`: Input should be greater than or equal to 0",
    lambda r: r.manifest(verify={"max_new_tokens": -1}),
)
simple("dtype-a-list", "`dtype`", lambda r: r.manifest(dtype=["float32"]))
simple("version-2", "`version`: Input should be 1", lambda r: r.manifest(version=2))
simple(
    "duplicate-nested-key",
    "manifest.yaml:5: duplicate key `output.path`",
    lambda r: r.yaml_with("output:\n  path: ./out\n  path: ./other\n"),
)
simple("non-string-key", "mapping keys must be plain strings", lambda r: r.yaml_with("output: ./out\n1: one\n"))
simple(
    "merge-key",
    "YAML merge keys (`<<`) are not allowed",
    lambda r: r.yaml_with("defaults: &d {path: ./out}\noutput:\n  <<: *d\n"),
)

# YAML tags: safe loading only, and a payload that would run is never constructed
simple(
    "tag-python-object-apply",
    "YAML tag `tag:yaml.org,2002:python/object/apply:os.system` is not allowed",
    lambda r: r.yaml_with(f"output: !!python/object/apply:os.system ['touch {r.marker}']\n"),
)
simple(
    "tag-python-object-new",
    "YAML tag `tag:yaml.org,2002:python/object/new:subprocess.Popen` is not allowed",
    lambda r: r.yaml_with(f"output: !!python/object/new:subprocess.Popen [[touch, '{r.marker}']]\n"),
)
simple(
    "tag-python-object-on-mapping",
    "YAML tag `tag:yaml.org,2002:python/object:pathlib.PosixPath` is not allowed",
    lambda r: r.yaml_with("output: !!python/object:pathlib.PosixPath {}\n"),
)
simple(
    "tag-python-name",
    "YAML tag `tag:yaml.org,2002:python/name:os.system` is not allowed",
    lambda r: r.yaml_with("output: !!python/name:os.system ''\n"),
)
simple(
    "tag-python-module",
    "YAML tag `tag:yaml.org,2002:python/module:os` is not allowed",
    lambda r: r.yaml_with("output: !!python/module:os ''\n"),
)
simple("tag-local", "YAML tag `!release` is not allowed", lambda r: r.yaml_with("output: !release ./out\n"))
simple(
    "tag-binary",
    "YAML tag `tag:yaml.org,2002:binary` is not allowed",
    lambda r: r.yaml_with("output: !!binary Li9vdXQ=\n"),
)
simple(
    "tag-set",
    "YAML tag `tag:yaml.org,2002:set` is not allowed",
    lambda r: r.yaml_with("output: ./out\ntokenizer: !!set {a, b}\n"),
)
simple(
    "tag-omap",
    "YAML tag `tag:yaml.org,2002:omap` is not allowed",
    lambda r: r.yaml_with("output: !!omap [path: ./out]\n"),
)
simple(
    "tag-timestamp",
    "YAML tag `tag:yaml.org,2002:timestamp` is not allowed",
    lambda r: r.yaml_with("output: ./out\ntokenizer: !!timestamp 2001-12-14\n"),
)
simple(
    "tag-bool-not-a-bool",
    "manifest.yaml:3: cannot read value 'maybe' as bool",
    lambda r: r.yaml_with("output: {path: ./out, overwrite: !!bool maybe}\n"),
)
simple(
    "tag-int-not-an-int",
    "cannot read value 'many' as int",
    lambda r: r.yaml_with("output: ./out\nversion: !!int many\n"),
)

# bombs and oversized input
simple(
    "alias-bomb-billion-laughs",
    "more than 10000 YAML nodes (alias bomb?)",
    lambda r: r.yaml_with(
        "output: ./out\nverify:\n  prompts: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"x{i}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
    ),
)
simple(
    "alias-bomb-in-adapters",
    "more than 10000 YAML nodes (alias bomb?)",
    lambda r: r.text(
        f"base: {r.base()}\noutput: ./out\n_a: &a [{', '.join([str(r.adapter())] * 30)}]\n_b: &b [{', '.join(['*a'] * 30)}]\n"
        f"_c: &c [{', '.join(['*b'] * 30)}]\nadapters: *c\n"
    ),
)
simple(
    "deeply-nested-flow", "nested too deeply", lambda r: r.yaml_with("output: " + "[" * 50_000 + "]" * 50_000 + "\n")
)
simple(
    "deeply-nested-block",
    "nested",
    lambda r: r.yaml_with(
        "output: ./out\nverify:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(300)) + "  " * 301 + "end\n"
    ),
)
simple(
    "huge-manifest", "is larger than 1048576 bytes", lambda r: r.yaml_with("output: ./out\n" + "# padding\n" * 120_000)
)


# the manifest file itself
@case("manifest-is-a-folder", "is a folder, not a YAML file")
def _(r: Rig) -> Path:
    (r.run / "manifest.yaml").mkdir()
    return r.run / "manifest.yaml"


simple("manifest-missing", "does not exist", lambda r: r.run / "manifest.yaml")


@case("manifest-is-a-fifo", "is not a regular file")
def _(r: Rig) -> Path:
    os.mkfifo(r.run / "manifest.yaml")
    return r.run / "manifest.yaml"


@case("manifest-links-to-dev-zero", "is not a regular file")
def _(r: Rig) -> Path:
    (r.run / "manifest.yaml").symlink_to("/dev/zero")
    return r.run / "manifest.yaml"


# where the output goes
simple("output-equals-the-base", "overlaps input", lambda r: r.manifest(output=str(r.base())))
simple("output-inside-the-adapter", "overlaps input", lambda r: r.manifest(output=str(r.adapter() / "merged")))
simple("output-contains-the-inputs", "overlaps input", lambda r: r.manifest(output=str(r.inputs)))


@case("output-through-a-link-into-the-base", "overlaps input")
def _(r: Rig) -> Path:
    (r.run / "link").symlink_to(r.base())
    return r.manifest(output="./link/merged")


@case("output-is-a-file", "exists and is not a folder")
def _(r: Rig) -> Path:
    (r.run / "out").write_text("not a release\n")
    return r.manifest()


@case("output-parent-is-a-file", "is a file, not a folder")
def _(r: Rig) -> Path:
    (r.run / "dist").write_text("a file\n")
    return r.manifest(output="./dist/out")


simple(
    "path-in-an-unknown-home",
    "path '~no-such-user-here/base' cannot be used",
    lambda r: r.manifest(base="~no-such-user-here/base"),
)
simple(
    "path-with-a-nul-byte",
    "path './adapter\\x00' cannot be used: embedded null byte",
    lambda r: r.text(f'base: {r.base()}\nadapters: ["./adapter\\0"]\noutput: ./out\n'),
)


@case("base-is-a-symlink-loop", "path './loop' cannot be used: Symlink loop")
def _(r: Rig) -> Path:
    (r.run / "loop").symlink_to(r.run / "loop")
    return r.manifest(base="./loop")


simple(
    "base-by-hub-id",
    "(revision `0000000000000000000000000000000000000000`) is not in the local Hugging Face cache",
    lambda r: r.manifest(base={"id": "org/model", "revision": "0" * 40}),
)
simple("tokenizer-folder-missing", "no tokenizer files", lambda r: r.manifest(tokenizer="./no-tokenizer-here"))


@case("device-cuda-absent", "no CUDA device is available")
def _(r: Rig) -> Path:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    return r.manifest(device_map="cuda:0")


# --------------------------------------------------------------------------- safetensors (the base)

simple(
    "st-truncated-in-length-field",
    "too short for a header length",
    lambda r: mutate_base(r, lambda p: p.write_bytes(p.read_bytes()[:5])),
)
simple(
    "st-truncated-in-header",
    "is truncated: header of",
    lambda r: mutate_base(r, lambda p: p.write_bytes(p.read_bytes()[:60])),
)
simple(
    "st-truncated-in-data",
    "is truncated: the header accounts for",
    lambda r: mutate_base(r, lambda p: p.write_bytes(p.read_bytes()[:-100])),
)
simple(
    "st-absurd-header-length",
    f"exceeds the {MAX_HEADER_BYTES}-byte limit",
    lambda r: mutate_base(r, lambda p: st_write(p, *st_parts(p), length=2**64 - 1)),
)
simple(
    "st-header-length-one-over-the-cap",
    f"header length {MAX_HEADER_BYTES + 1} exceeds",
    lambda r: mutate_base(r, lambda p: st_write(p, *st_parts(p), length=MAX_HEADER_BYTES + 1)),
)
simple(
    "st-header-not-json", "header is not valid JSON", lambda r: base_file(r, lambda p: st_write(p, b"{not json}", b""))
)
simple(
    "st-header-not-utf8", "header is not valid JSON", lambda r: base_file(r, lambda p: st_write(p, b"\xff\xfe{}", b""))
)
simple(
    "st-header-a-json-array",
    "header is not a JSON object",
    lambda r: base_file(r, lambda p: st_write(p, b"[1, 2]", b"")),
)
simple(
    "st-header-nested-100k-deep",
    "JSON nested too deeply",
    lambda r: base_file(r, lambda p: st_write(p, b"[" * 100_000 + b"]" * 100_000, b"")),
)
simple(
    "st-header-5000-digit-number",
    "header is not valid JSON",
    lambda r: base_file(
        r,
        lambda p: st_write(
            p, b'{"w": {"dtype": "F32", "shape": [' + b"7" * 5000 + b'], "data_offsets": [0, 4]}}', b"\0" * 4
        ),
    ),
)
simple(
    "st-duplicate-keys",
    "duplicate tensor name `w`",
    lambda r: base_file(
        r,
        lambda p: st_write(
            p,
            b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
            b"\0" * 16,
        ),
    ),
)


def _overlap(h: dict) -> None:
    names = sorted((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"][0])
    second = h[names[1]]
    second["data_offsets"] = [o - 4 for o in second["data_offsets"]]


def _gap(h: dict) -> None:
    names = sorted((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"][0])
    for n in names[1:]:
        h[n]["data_offsets"] = [o + 8 for o in h[n]["data_offsets"]]


def _with_gap(p: Path) -> None:
    header, data = st_parts(p)
    _gap(header)
    first = min((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    end = first["data_offsets"][1]
    st_write(p, header, data[:end] + b"\0" * 8 + data[end:])


simple(
    "st-overlapping-offsets", "overlaps the previous tensor", lambda r: mutate_base(r, lambda p: st_edit(p, _overlap))
)
simple("st-gapped-offsets", "leaves a gap before it", lambda r: mutate_base(r, _with_gap))
simple(
    "st-length-disagrees-with-shape",
    "needs",
    lambda r: mutate_base(r, lambda p: st_edit(p, lambda h: h["model.norm.weight"].update(shape=[33]))),
)
simple(
    "st-length-disagrees-with-dtype",
    "but F16 [32] needs 64",
    lambda r: mutate_base(r, lambda p: st_edit(p, lambda h: h["model.norm.weight"].update(dtype="F16"))),
)
simple(
    "st-unsupported-dtype",
    "has unsupported dtype 'F4'",
    lambda r: mutate_base(r, lambda p: st_edit(p, lambda h: h["model.norm.weight"].update(dtype="F4"))),
)
simple(
    "st-negative-offsets",
    "has invalid data_offsets",
    lambda r: mutate_base(r, lambda p: st_edit(p, lambda h: h["model.norm.weight"].update(data_offsets=[8, -8]))),
)
simple(
    "st-metadata-not-strings",
    "`__metadata__` must map strings to strings",
    lambda r: mutate_base(r, lambda p: st_edit(p, lambda h: h.update(__metadata__={"format": 1}))),
)
simple(
    "st-trailing-bytes",
    "has 16 trailing bytes",
    lambda r: mutate_base(r, lambda p: p.write_bytes(p.read_bytes() + b"\0" * 16)),
)
simple("st-empty-file", "0 bytes, too short for a header length", lambda r: base_file(r, lambda p: p.write_bytes(b"")))
simple("st-fifo", "is not a regular file", lambda r: base_file(r, fifo))
simple("st-link-to-dev-zero", "is not a regular file", lambda r: base_file(r, dev_zero))
simple("st-a-folder", "is not a regular file", lambda r: base_file(r, lambda p: p.mkdir()))
simple(
    "st-tensor-name-with-a-newline",
    "tensor name 'model.norm.weight\\nlm_head.weight' holds control characters",
    lambda r: mutate_base(
        r, lambda p: st_edit(p, lambda h: h.update({"model.norm.weight\nlm_head.weight": h.pop("model.norm.weight")}))
    ),
)
simple(
    "st-embedding-1d",
    "the input embedding `model.embed_tokens.weight` has shape [3072]; an embedding is [vocab, hidden]",
    lambda r: mutate_base(
        r, lambda p: tensors_edit(p, lambda t: t.update({"model.embed_tokens.weight": torch.zeros(96 * 32)}))
    ),
)
simple(
    "st-embedding-0d",
    "the input embedding `model.embed_tokens.weight` has shape []",
    lambda r: mutate_base(
        r, lambda p: tensors_edit(p, lambda t: t.update({"model.embed_tokens.weight": torch.zeros(())}))
    ),
)
simple(
    "st-targeted-tensor-not-float",
    "is stored as I32; LoRA changes to non-float tensors are not supported",
    lambda r: mutate_base(
        r,
        lambda p: tensors_edit(
            p, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32, dtype=torch.int32)})
        ),
    ),
)

# the index of a sharded base
simple(
    "index-names-a-missing-shard",
    "model-00002-of-00002.safetensors` does not exist",
    lambda r: index_edit(r, lambda i, b: (b / "model-00002-of-00002.safetensors").unlink()),
)


@case("index-tensor-in-two-shards", "is in both")
def _(r: Rig) -> Path:
    def edit(index: dict, base: Path) -> None:
        one, two = base / "model-00001-of-00002.safetensors", base / "model-00002-of-00002.safetensors"
        first = load_file(one)
        name = sorted(first)[0]
        tensors_edit(two, lambda t: t.update({name: first[name]}))

    return index_edit(r, edit)


@case("index-gives-a-tensor-twice", "gives the key `lm_head.weight` twice")
def _(r: Rig) -> Path:
    base = sharded_base(r)
    text = (base / INDEX).read_text()
    text = text.replace('"weight_map": {', '"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", ', 1)
    (base / INDEX).write_text(text)
    return r.manifest(base=base)


simple(
    "index-shard-with-dotdot",
    "only plain file names in the folder are allowed",
    lambda r: index_edit(
        r, lambda i, b: i["weight_map"].update({"lm_head.weight": "../model-00001-of-00002.safetensors"})
    ),
)
simple(
    "index-shard-absolute",
    "only plain file names in the folder are allowed",
    lambda r: index_edit(r, lambda i, b: i["weight_map"].update({"lm_head.weight": "/etc/passwd"})),
)
simple(
    "index-shard-with-nul",
    "only plain file names in the folder are allowed",
    lambda r: index_edit(r, lambda i, b: i["weight_map"].update({"lm_head.weight": "model\u0000.safetensors"})),
)
simple(
    "index-points-at-a-bin-shard",
    "only .safetensors shards are read",
    lambda r: index_edit(
        r, lambda i, b: i["weight_map"].update({"lm_head.weight": "pytorch_model-00001-of-00002.bin"})
    ),
)


@case("index-not-json", "model.safetensors.index.json` is not valid JSON")
def _(r: Rig) -> Path:
    base = sharded_base(r)
    (base / INDEX).write_text("{weight_map: {}}")
    return r.manifest(base=base)


simple("index-without-weight-map", "has no `weight_map`", lambda r: index_edit(r, lambda i, b: i.pop("weight_map")))
simple(
    "index-lists-a-tensor-no-shard-holds",
    "but that shard does not hold it",
    lambda r: index_edit(
        r, lambda i, b: i["weight_map"].update({"model.extra.weight": "model-00001-of-00002.safetensors"})
    ),
)
simple(
    "index-omits-a-tensor",
    "which `model.safetensors.index.json` does not list",
    lambda r: index_edit(r, lambda i, b: i["weight_map"].pop("lm_head.weight")),
)

# the rest of the base folder
simple(
    "base-config-missing", "has no config.json", lambda r: mutate_base(r, lambda p: (p.parent / "config.json").unlink())
)
simple(
    "base-config-not-json",
    "config.json` is not valid JSON",
    lambda r: mutate_base(r, lambda p: (p.parent / "config.json").write_text("{'model_type': 'llama'}")),
)
simple(
    "base-config-a-list",
    "config.json` is not a JSON object",
    lambda r: mutate_base(r, lambda p: (p.parent / "config.json").write_text("[]")),
)
simple(
    "base-config-nested-100k-deep",
    "config.json` is not valid JSON: nested too deeply",
    lambda r: mutate_base(r, lambda p: (p.parent / "config.json").write_text("[" * 100_000 + "]" * 100_000)),
)
simple(
    "base-only-pickle-weights",
    "has only pickle weights (.bin)",
    lambda r: mutate_base(r, lambda p: p.rename(p.parent / "pytorch_model.bin")),
)
simple("base-is-a-file", "is not a folder", lambda r: r.manifest(base=str(r.base() / "config.json")))

# --------------------------------------------------------------------------- adapters

simple("adapter-missing", "does not exist", lambda r: r.manifest(adapters=[str(r.inputs / "no-such-adapter")]))
simple("adapter-is-a-file", "is not a folder", lambda r: r.manifest(adapters=[str(r.adapter() / ADAPTER_ST)]))
simple(
    "adapter-config-a-folder",
    "no adapter_config.json",
    lambda r: mutate_adapter(r, lambda a: ((a / "adapter_config.json").unlink(), (a / "adapter_config.json").mkdir())),
)
simple(
    "adapter-config-not-json",
    "adapter_config.json` is not valid JSON",
    lambda r: mutate_adapter(r, lambda a: (a / "adapter_config.json").write_text("peft_type: LORA\n")),
)
simple(
    "adapter-config-a-list",
    "adapter_config.json` is not a JSON object",
    lambda r: mutate_adapter(r, lambda a: (a / "adapter_config.json").write_text('["LORA"]')),
)
simple(
    "adapter-config-nested-100k-deep",
    "adapter_config.json` is not valid JSON: nested too deeply",
    lambda r: mutate_adapter(
        r, lambda a: (a / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    ),
)


@case("adapter-real-pickle-without-opt-in", "only a pickle `adapter_model.bin` is present")
def _(r: Rig) -> Path:
    def to_pickle(a: Path) -> None:
        torch.save(load_file(a / ADAPTER_ST), a / "adapter_model.bin")
        (a / ADAPTER_ST).unlink()

    return mutate_adapter(r, to_pickle)


@case("adapter-malicious-pickle-without-opt-in", "only a pickle `adapter_model.bin` is present")
def _(r: Rig) -> Path:
    def to_pickle(a: Path) -> None:
        malicious_pickle(a / "adapter_model.bin", r.marker)
        (a / ADAPTER_ST).unlink()

    return mutate_adapter(r, to_pickle)


@case("adapter-malicious-pickle-with-opt-in", "`adapter_model.bin`")
def _(r: Rig) -> Path:
    adapter = r.adapter()
    malicious_pickle(adapter / "adapter_model.bin", r.marker)
    (adapter / ADAPTER_ST).unlink()
    return r.manifest(adapters=[{"path": str(adapter), "allow_pickle": True}])


simple(
    "adapter-rank-pattern-disagrees",
    "has rank 8 in its tensors but adapter_config.json says r=4",
    lambda r: adapter_config(r, rank_pattern={"q_proj": 4}),
)
simple(
    "adapter-rank-zero",
    "`r` in adapter_config.json is 0; it must be a positive integer",
    lambda r: adapter_config(r, r=0),
)
simple(
    "adapter-rank-a-string",
    "`r` in adapter_config.json is '8'; it must be a positive integer",
    lambda r: adapter_config(r, r="8"),
)
simple("adapter-rank-null", "`r` in adapter_config.json is None", lambda r: adapter_config(r, r=None))
simple(
    "adapter-alpha-a-word",
    "`lora_alpha` in adapter_config.json is 'sixteen'",
    lambda r: adapter_config(r, lora_alpha="sixteen"),
)
simple(
    "adapter-alpha-infinite",
    "`lora_alpha` in adapter_config.json is inf",
    lambda r: adapter_config(r, lora_alpha=float("inf")),
)
simple(
    "adapter-rank-pattern-a-list",
    "`rank_pattern` in adapter_config.json is ['q_proj']",
    lambda r: adapter_config(r, rank_pattern=["q_proj"]),
)
simple(
    "adapter-rank-pattern-bad-regex",
    "`rank_pattern` pattern 'q_proj(' is not a valid regular expression",
    lambda r: adapter_config(r, rank_pattern={"q_proj(": 8}),
)
simple(
    "adapter-alpha-pattern-a-string-value",
    "`alpha_pattern` in adapter_config.json",
    lambda r: adapter_config(r, alpha_pattern={"v_proj": "32"}),
)
simple(
    "adapter-use-rslora-a-string",
    "`use_rslora` in adapter_config.json is 'false'; it must be true or false",
    lambda r: adapter_config(r, use_rslora="false"),
)
simple(
    "adapter-token-indices-malformed",
    "`trainable_token_indices` in adapter_config.json",
    lambda r: adapter_config(r, trainable_token_indices={"embed_tokens": 3}),
)
simple(
    "adapter-init-a-list",
    "`init_lora_weights` [1] is a LoRA variant mergekit-lite does not support",
    lambda r: adapter_config(r, init_lora_weights=[1]),
)
simple(
    "adapter-init-unknown",
    "`init_lora_weights` 'kaiming' is a LoRA variant",
    lambda r: adapter_config(r, init_lora_weights="kaiming"),
)
simple(
    "adapter-layer-replication",
    "`layer_replication` is set, and it duplicates layers",
    lambda r: adapter_config(r, layer_replication=[[0, 2], [1, 2]]),
)
simple(
    "adapter-use-dora-without-magnitudes",
    "`use_dora` is true but `model.layers.0.mlp.down_proj` has no `lora_magnitude_vector`",
    lambda r: adapter_config(r, use_dora=True),
)
simple(
    "adapter-peft-type-ia3",
    "`peft_type` is 'IA3'; mergekit-lite merges LoRA adapters only",
    lambda r: adapter_config(r, peft_type="IA3"),
)
simple("adapter-peft-type-loha", "`peft_type` is 'LOHA'", lambda r: adapter_config(r, peft_type="LOHA"))
simple(
    "adapter-peft-type-missing",
    "`peft_type` is None",
    lambda r: mutate_adapter(r, lambda a: config_edit(a, lambda c: c.pop("peft_type"))),
)
simple("adapter-peft-type-a-number", "`peft_type` is 7", lambda r: adapter_config(r, peft_type=7))
for _init in ("pissa", "pissa_niter_16", "olora", "corda", "loftq"):
    simple(
        f"adapter-unconverted-{_init.replace('_', '-')}",
        f"`init_lora_weights` is '{_init}': this adapter was initialised from the base weights",
        lambda r, _init=_init: adapter_config(r, init_lora_weights=_init),
    )

# adapter tensors
simple(
    "adapter-for-another-base-in-dim",
    "LoRA factors give a 32x48 delta, which does not fit",
    lambda r: adapter_tensors(r, lambda t: t.update({Q_A: torch.randn(8, 48)})),
)
simple(
    "adapter-for-another-base-missing-target",
    "which the base model does not have",
    lambda r: adapter_tensors(r, lambda t: t.update({k.replace("q_proj", "qkv_proj"): t.pop(k) for k in [Q_A, Q_B]})),
)
simple(
    "adapter-one-factor-missing",
    "has only one of its two LoRA factors",
    lambda r: adapter_tensors(r, lambda t: t.pop(Q_B)),
)
simple(
    "adapter-targets-matched-nothing",
    "`adapter_model.safetensors` holds no tensors",
    lambda r: mutate_adapter(r, lambda a: ((a / ADAPTER_ST).unlink(), save_file({}, a / ADAPTER_ST))),
)
simple(
    "adapter-keys-without-prefix",
    "does not start with `base_model.model.`",
    lambda r: adapter_tensors(r, lambda t: t.update({k[len(PREFIX) :]: t.pop(k) for k in list(t)})),
)
simple(
    "adapter-unknown-lora-tensor",
    "is a LoRA tensor of a kind mergekit-lite does not know",
    lambda r: adapter_tensors(r, lambda t: t.update({Q_A.replace("lora_A", "lora_C"): torch.zeros(8, 32)})),
)
simple(
    "adapter-integer-factor",
    "is stored as I32; LoRA tensors are floating point",
    lambda r: adapter_tensors(r, lambda t: t.update({Q_A: torch.ones(8, 32, dtype=torch.int32)})),
)
simple(
    "adapter-nan-in-factor",
    f"`{Q_B}` contains NaN or Inf values",
    lambda r: adapter_tensors(r, lambda t: t[Q_B].view(-1).__setitem__(3, float("nan"))),
)
simple(
    "adapter-inf-in-factor",
    f"`{Q_A}` contains NaN or Inf values",
    lambda r: adapter_tensors(r, lambda t: t[Q_A].view(-1).__setitem__(0, float("-inf"))),
)
simple(
    "adapter-weights-truncated",
    "is truncated",
    lambda r: mutate_adapter(r, lambda a: (a / ADAPTER_ST).write_bytes((a / ADAPTER_ST).read_bytes()[:-10])),
)
simple(
    "adapter-weights-fifo",
    "no adapter_model.safetensors in",
    lambda r: mutate_adapter(r, lambda a: ((a / ADAPTER_ST).unlink(), fifo(a / ADAPTER_ST))),
)
simple(
    "adapter-weights-link-to-dev-zero",
    "no adapter_model.safetensors in",
    lambda r: mutate_adapter(r, lambda a: ((a / ADAPTER_ST).unlink(), dev_zero(a / ADAPTER_ST))),
)


# --------------------------------------------------------------------------- the check


def snapshot(*folders: Path) -> dict[str, str]:
    """Every entry under the folders: sha256 of regular files, link targets, kinds of the rest.
    Never opens a FIFO or a device."""
    found: dict[str, str] = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                mode = path.lstat().st_mode
                if stat.S_ISLNK(mode):
                    found[str(path)] = "link -> " + os.readlink(path)
                elif stat.S_ISREG(mode):
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                else:
                    found[str(path)] = "dir" if stat.S_ISDIR(mode) else f"mode {stat.S_IFMT(mode):o}"
    return found


@pytest.mark.parametrize("hostile", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_cleanly(hostile: Case, tmp_path: Path, zoo) -> None:
    rig = Rig(tmp_path, zoo)
    manifest = hostile.build(rig)
    shared = [zoo.base("llama"), zoo.adapter("llama_lora")]
    before = snapshot(tmp_path, *shared)

    result = CliRunner().invoke(main, ["merge", str(manifest)])

    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__}: {result.exception}"
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"want one `error:` line last, got:\n{result.stderr}"
    noise = [line for line in lines[:-1] if not line.startswith(("warning: ", "merging:"))]
    assert not noise, f"unexpected stderr lines: {noise}"
    assert hostile.needle in errors[0], errors[0]
    assert result.exit_code == 2, errors[0]
    assert not rig.marker.exists(), "a payload in the input ran"
    assert snapshot(tmp_path, *shared) == before, "something was written, or an input changed"


def test_warnings_from_other_libraries_stay_on_one_line(tmp_path: Path, zoo) -> None:
    """An architecture transformers does not know is not an error (names are guessed), but its long
    multi-line explanation must come out as one `warning:` line."""
    rig = Rig(tmp_path, zoo)
    base = rig.base()
    (base / "config.json").write_text(json.dumps({"model_type": "no-such-architecture", "vocab_size": 96}))
    result = CliRunner().invoke(main, ["plan", str(rig.manifest(base=base))])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("warning: ") for line in lines), result.stderr
    assert any("guessing embedding names" in line for line in lines)


# --------------------------------------------------------------------------- pickle opt-in


def _pickled_adapter(rig: Rig, payload: bool) -> Path:
    adapter = rig.adapter("pickled")
    tensors = load_file(adapter / ADAPTER_ST)
    (adapter / ADAPTER_ST).unlink()
    if payload:
        torch.save({**tensors, "payload": Payload(rig.marker)}, adapter / "adapter_model.bin")
    else:
        torch.save(tensors, adapter / "adapter_model.bin")
    return adapter


def test_the_malicious_pickle_is_live(tmp_path: Path, zoo) -> None:
    """Negative control: the payload the tests above refuse does run when unpickled unsafely."""
    rig = Rig(tmp_path, zoo)
    adapter = _pickled_adapter(rig, payload=True)
    torch.load(adapter / "adapter_model.bin", weights_only=False)
    assert rig.marker.exists()


def test_opt_in_refuses_a_malicious_pickle_without_running_it(tmp_path: Path, zoo) -> None:
    from mergekit_lite.errors import AdapterError
    from mergekit_lite.sources.adapter import read_adapter

    rig = Rig(tmp_path, zoo)
    adapter = _pickled_adapter(rig, payload=True)
    with pytest.raises(AdapterError) as info:
        read_adapter(adapter, 0, 1.0, allow_pickle=True)
    message = str(info.value)
    assert "`adapter_model.bin` is not a plain tensor pickle; torch.load(weights_only=True) refused it" in message
    assert "unsupported GLOBAL posix.system" in message, message
    assert "weights_only` set to `False`" not in message  # no advice to load it unsafely
    assert "\n" not in message
    assert not rig.marker.exists()


def test_opt_in_reads_a_plain_pickle_like_its_safetensors_twin(tmp_path: Path, zoo) -> None:
    """With the opt-in, adapter_model.bin is converted to a temporary safetensors file and merges to the
    same bytes as the safetensors adapter it was made from (negative control: without it, refused)."""
    from mergekit_lite.errors import AdapterError
    from mergekit_lite.io.reader import TensorReader
    from mergekit_lite.merge.merge import write_shards
    from mergekit_lite.plan.build import build_plan
    from mergekit_lite.sources.adapter import read_adapter
    from mergekit_lite.sources.checkpoint import read_checkpoint

    rig = Rig(tmp_path, zoo)
    pickled = _pickled_adapter(rig, payload=False)
    with pytest.raises(AdapterError, match="allow_pickle: true"):
        read_adapter(pickled, 0, 1.0)
    ckpt = read_checkpoint(zoo.base("llama"))
    outputs = {}
    for name, adapter in (
        ("pickle", read_adapter(pickled, 0, 1.0, allow_pickle=True)),
        ("safetensors", read_adapter(zoo.adapter("llama_lora"), 0, 1.0)),
    ):
        folder = tmp_path / name
        folder.mkdir()
        plan = build_plan(ckpt, [adapter], "float32", 10**9)
        write_shards(plan, TensorReader(ckpt.tensors), [adapter], folder, torch.device("cpu"))
        outputs[name] = (folder / ST).read_bytes()
    converted = read_adapter(pickled, 0, 1.0, allow_pickle=True)
    assert converted.weights_file == pickled / "adapter_model.bin"
    assert not converted.keys[0].entry.file.is_relative_to(tmp_path), "the conversion must not write beside the inputs"
    assert outputs["pickle"] == outputs["safetensors"]
    assert sorted(p.name for p in pickled.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]


def test_opt_in_through_the_cli_merges_a_plain_pickle(tmp_path: Path, zoo) -> None:
    rig = Rig(tmp_path, zoo)
    pickled = _pickled_adapter(rig, payload=False)
    manifest = rig.manifest(adapters=[{"path": str(pickled), "allow_pickle": True}])
    result = CliRunner().invoke(main, ["merge", "-q", str(manifest)])
    assert result.exit_code == 0, result.output
    assert (rig.run / "out" / ST).is_file()
    receipt = json.loads((rig.run / "out" / "release.json").read_text())
    assert any(entry["path"].endswith("adapter_model.bin") for entry in receipt["inputs"])


CORPUS_SIZE = len(CASES)
