"""Fuzzing the parsers of untrusted input: the manifest loader, the safetensors header parser and
the adapter config vetting. Whatever the bytes, the answer is a valid result or an error of our
own hierarchy with a one-line message, never another exception (which the CLI would show as a
traceback).

Each test is bounded (at most 200 examples, no deadline); together they run in well under a minute.
No example database is written (`database=None`): a failure prints the example to reproduce it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_lite.errors import MergekitError
from mergekit_lite.io.format import DTYPES, ITEMSIZE, Header, read_header
from mergekit_lite.manifest.load import LoadedManifest, load_manifest

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL = settings(FUZZ, max_examples=100)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def clean_error(exc: MergekitError) -> None:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message, repr(message)


# --------------------------------------------------------------------------- the manifest loader

VALID = """\
base: ./models/base
adapters:
  - path: ./adapters/a
    weight: 0.5
    allow_pickle: false
  - ./adapters/b
dtype: bfloat16
device_map: cpu
output: {path: ./dist/out, max_shard_size: 2GiB, overwrite: true}
tokenizer: adapter
verify:
  prompts: ["Hello!", "What is 2+2?"]
  logits: true
  max_new_tokens: 8
  thresholds: {top1_agreement: 0.99}
"""
KEYS = [
    "version",
    "base",
    "adapters",
    "path",
    "id",
    "revision",
    "weight",
    "allow_pickle",
    "dtype",
    "device_map",
    "output",
    "max_shard_size",
    "overwrite",
    "tokenizer",
    "verify",
    "enabled",
    "prompts",
    "logits",
    "max_new_tokens",
    "thresholds",
    "top1_agreement",
    "mean_kl",
    "<<",
    "",
    "base ",
    "Base",
]
YAML_SPECIALS = list(":-[]{}&*!|>'\"%@`#,?\t\n ~\\\0") + [
    "!!python/object/apply:os.system",
    "&a",
    "*a",
    "---",
    "...",
    "!!binary",
    "<<: *a",
    ".inf",
    ".nan",
    "0x1F",
    "1e999",
    "~user/x",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(
        [
            "./base",
            "~/x",
            "~nosuchuser/x",
            "/dev/zero",
            "5GB",
            "1.5MiB",
            "0B",
            "cuda:1",
            "float16",
            "auto",
            "a\x00b",
            "../" * 8,
            "x" * 300,
        ]
    )
)
documents = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=25,
)


def mutated(text: str, edits: list[tuple[int, int, str]]) -> str:
    """Apply (position, how many characters to delete, what to insert) edits, in order."""
    for position, delete, insert in edits:
        at = position % (len(text) + 1)
        text = text[:at] + insert + text[at + delete :]
    return text


def check_manifest(path: Path) -> None:
    try:
        loaded = load_manifest(path)
    except MergekitError as exc:
        clean_error(exc)
        return
    assert isinstance(loaded, LoadedManifest)
    # the derived values a merge uses next must also answer cleanly
    for attribute in ("base_path", "adapter_paths", "output_path", "max_shard_bytes"):
        try:
            getattr(loaded, attribute)
        except MergekitError as exc:
            clean_error(exc)


@FUZZ
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400))
def test_manifest_any_text(scratch: Path, text: str) -> None:
    path = scratch / "manifest.yaml"
    path.write_text(text, encoding="utf-8")
    check_manifest(path)


@SMALL
@given(raw=st.binary(max_size=400))
def test_manifest_any_bytes(scratch: Path, raw: bytes) -> None:
    path = scratch / "manifest.yaml"
    path.write_bytes(raw)
    check_manifest(path)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 12), st.sampled_from(YAML_SPECIALS) | st.text(max_size=6)),
        min_size=1,
        max_size=6,
    )
)
def test_manifest_mutations_of_a_valid_one(scratch: Path, edits: list[tuple[int, int, str]]) -> None:
    path = scratch / "manifest.yaml"
    path.write_text(mutated(VALID, edits), encoding="utf-8", errors="surrogatepass")
    check_manifest(path)


@FUZZ
@given(doc=documents)
def test_manifest_random_documents(scratch: Path, doc) -> None:
    import yaml

    path = scratch / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    check_manifest(path)


@FUZZ
@given(
    overrides=st.dictionaries(
        st.sampled_from(["base", "adapters", "dtype", "device_map", "output", "tokenizer", "verify", "version"]),
        documents,
        max_size=3,
    )
)
def test_manifest_valid_one_with_random_values(scratch: Path, overrides: dict) -> None:
    import yaml

    doc = yaml.safe_load(VALID)
    doc.update(overrides)
    path = scratch / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    check_manifest(path)


def test_manifest_control_the_valid_one_loads(scratch: Path) -> None:
    """Negative control: the text the mutations start from is accepted."""
    path = scratch / "manifest.yaml"
    path.write_text(VALID)
    loaded = load_manifest(path)
    assert [a.weight for a in loaded.manifest.adapters] == [0.5, 1.0]


# --------------------------------------------------------------------------- the safetensors header parser


def valid_file() -> bytes:
    """A small valid safetensors file (several dtypes, a zero-size tensor, metadata)."""
    import io
    import tempfile

    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.bfloat16),
        "c": torch.zeros(0, 3, dtype=torch.float16),
        "d": torch.arange(3, dtype=torch.int64),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.safetensors"
        save_file(tensors, path, metadata={"format": "pt"})
        return io.BytesIO(path.read_bytes()).getvalue()


VALID_FILE = valid_file()


def check_header(path: Path) -> None:
    """read_header answers cleanly; what it accepts, the reference reader reads the same way."""
    try:
        header = read_header(path)
    except MergekitError as exc:
        clean_error(exc)
        return
    assert isinstance(header, Header)
    cursor = header.data_start
    for entry in sorted(header.tensors.values(), key=lambda e: e.begin):
        assert entry.begin == cursor and entry.nbytes == math.prod(entry.shape) * ITEMSIZE[entry.dtype]
        cursor += entry.nbytes
    assert cursor == header.file_size == path.stat().st_size
    with safe_open(str(path), framework="pt") as handle:  # what we accept, safetensors must read
        assert set(handle.keys()) == set(header.tensors)
        for name, entry in header.tensors.items():
            tensor = handle.get_tensor(name)
            assert tuple(tensor.shape) == entry.shape and tensor.dtype == DTYPES[entry.dtype]


def test_header_control_the_valid_file_parses(scratch: Path) -> None:
    path = scratch / "x.safetensors"
    path.write_bytes(VALID_FILE)
    check_header(path)
    assert set(read_header(path).tensors) == {"a", "b", "c", "d"}


@FUZZ
@given(raw=st.binary(max_size=300))
def test_header_random_bytes(scratch: Path, raw: bytes) -> None:
    path = scratch / "x.safetensors"
    path.write_bytes(raw)
    check_header(path)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(VALID_FILE) - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_header_flipped_bytes(scratch: Path, flips: list[tuple[int, int]]) -> None:
    raw = bytearray(VALID_FILE)
    for position, mask in flips:
        raw[position] ^= mask
    path = scratch / "x.safetensors"
    path.write_bytes(bytes(raw))
    check_header(path)


@SMALL
@given(cut=st.integers(0, len(VALID_FILE) - 1), tail=st.binary(max_size=24))
def test_header_truncated_or_extended(scratch: Path, cut: int, tail: bytes) -> None:
    path = scratch / "x.safetensors"
    path.write_bytes(VALID_FILE[:cut] + tail)
    check_header(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPES, "F4", "bf16", "", "U64"]) | json_values,
        "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 200), min_size=2, max_size=2) | json_values,
    },
    optional={"extra": json_values},
)
headers = st.dictionaries(st.text(max_size=8) | st.just("__metadata__"), entries | json_values, max_size=5)


@FUZZ
@given(
    header=headers | json_values, data=st.binary(max_size=200), length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**63])
)
def test_header_random_json(scratch: Path, header, data: bytes, length_delta: int) -> None:
    raw = json.dumps(header).encode()
    length = max(0, len(raw) + length_delta) % 2**64
    path = scratch / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    check_header(path)


@FUZZ
@given(
    specs=st.lists(st.tuples(st.sampled_from(list(DTYPES)), st.lists(st.integers(0, 4), max_size=3)), max_size=5),
    slack=st.sampled_from([0, 0, 0, 1, -1]),
    pad=st.sampled_from([0, 1, 7, 8]),
    metadata=st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
)
def test_header_nearly_valid_files(scratch: Path, specs, slack: int, pad: int, metadata: dict) -> None:
    """Well-formed headers with exact or off-by-one data: accepted exactly when the bytes add up."""
    doc: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for i, (dtype, shape) in enumerate(specs):
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        doc[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(doc).encode() + b" " * pad
    assume(offset + slack >= 0)
    path = scratch / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (offset + slack))
    check_header(path)
    if slack == 0:
        assert set(read_header(path).tensors) == set(doc) - {"__metadata__"}
    else:
        with pytest.raises(MergekitError):
            read_header(path)


# --------------------------------------------------------------------------- the adapter config


@pytest.fixture(scope="module")
def adapter_weights(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("fuzz-adapter")
    prefix = "base_model.model.model.layers.0.self_attn."
    save_file(
        {
            f"{prefix}q_proj.lora_A.weight": torch.ones(4, 8),
            f"{prefix}q_proj.lora_B.weight": torch.ones(8, 4),
            f"{prefix}v_proj.lora_A.weight": torch.ones(4, 8),
            f"{prefix}v_proj.lora_B.weight": torch.ones(8, 4),
        },
        folder / "adapter_model.safetensors",
    )
    return (folder / "adapter_model.safetensors").read_bytes()


CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "init_lora_weights",
    "trainable_token_indices",
    "layer_replication",
    "target_modules",
    "bias",
]
config_values = json_values | st.sampled_from(
    [
        0,
        -1,
        4,
        8,
        16.0,
        "8",
        True,
        "pissa",
        "olora_x",
        "gaussian",
        {"q_proj": 4},
        {"q_proj(": 4},
        {"v_proj": 0},
        {"q": "x"},
        [1, 2],
    ]
)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=6), config_values, max_size=5))
def test_adapter_config_random_values(scratch: Path, adapter_weights: bytes, changes: dict) -> None:
    from mergekit_lite.sources.adapter import read_adapter

    folder = scratch / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(adapter_weights)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **changes}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    try:
        adapter = read_adapter(folder, 0, 1.0)
    except MergekitError as exc:
        clean_error(exc)
        return
    for key in adapter.keys:  # what the plan computes next from the config must not crash either
        r, alpha = adapter.rank_alpha(key.module)
        assert r > 0 and math.isfinite(alpha)
        assert math.isfinite(adapter.scaling(key.module))


@pytest.mark.parametrize("shape", [[2**63, 0], [2**32, 2**32, 0], [0, 2**63, 2], [2**62, 8, 0]])
def test_header_shapes_the_reference_reader_cannot_hold(scratch: Path, shape: list[int]) -> None:
    """Zero-byte tensors whose shape overflows 64 bits (found by the differential fuzz above): the
    reference reader refuses them, so the parser must too."""
    raw = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = scratch / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(MergekitError, match="invalid shape|overflows 64 bits"):
        read_header(path)
