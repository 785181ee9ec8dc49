"""The manifest: strict schema, short forms, errors with key and line, safe YAML only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.errors import ManifestError
from mergekit_lite.manifest.load import load_manifest
from mergekit_lite.sizes import parse_size


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_full_manifest_and_defaults(tmp_path: Path) -> None:
    loaded = load_manifest(
        write(
            tmp_path,
            """
base: ./models/base
adapters:
  - path: ./adapters/a
    weight: 0.5
  - ./adapters/b
dtype: bfloat16
device_map: cuda:1
output: {path: ../dist/out, max_shard_size: 2GiB, overwrite: true}
tokenizer: base
verify:
  prompts: ["Hello!"]
  thresholds: {top1_agreement: 0.98}
""",
        )
    )
    m = loaded.manifest
    assert loaded.base_path == (tmp_path / "models/base").resolve()
    assert loaded.adapter_paths == [(tmp_path / "adapters/a").resolve(), (tmp_path / "adapters/b").resolve()]
    assert [a.weight for a in m.adapters] == [0.5, 1.0]
    assert loaded.output_path == (tmp_path.parent / "dist/out").resolve()
    assert loaded.max_shard_bytes == 2 * 2**30
    assert m.output.overwrite is True
    assert m.verify.thresholds == {"top1_agreement": 0.98}


def test_short_forms_and_defaults(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, "base: b\nadapters: [a]\noutput: o\n")).manifest
    assert (m.base.path, m.adapters[0].path, m.output.path) == ("b", "a", "o")
    assert (m.dtype, m.device_map, m.tokenizer, m.output.max_shard_size) == ("auto", "cpu", "adapter", "5GB")
    assert m.verify.enabled is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "base: b\nadapters: [a]\noutput: o\ndtpye: float16\n",
            "m.yaml:4: unknown key `dtpye`; did you mean `dtype`?",
            id="misspelt-top",
        ),
        pytest.param(
            "base: b\nadapters:\n  - path: a\n    weigth: 2\noutput: o\n",
            "m.yaml:4: unknown key `adapters[0].weigth`; did you mean `weight`?",
            id="misspelt-nested",
        ),
        pytest.param(
            "base: b\nadapters: [a]\noutput: {path: o, overwrite: 'yes'}\n",
            "m.yaml:3: `output.overwrite`: Input should be a valid boolean (got 'yes')",
            id="wrong-type",
        ),
        pytest.param(
            "base: b\nadapters:\n  - path: a\n    weight: '0.5'\noutput: o\n",
            "m.yaml:4: `adapters[0].weight`: Input should be a valid number (got '0.5')",
            id="string-number",
        ),
        pytest.param("base: b\noutput: o\n", "m.yaml:1: missing required key `adapters`", id="missing"),
        pytest.param(
            "base: b\nadapters: []\noutput: o\n",
            "m.yaml:2: `adapters`: List should have at least 1 item",
            id="no-adapters",
        ),
        pytest.param(
            "base: b\nadapters: [a]\noutput: o\ndtype: float64\n", "m.yaml:4: `dtype`: Input should be", id="dtype"
        ),
        pytest.param(
            "base: b\nadapters: [a]\noutput: o\ndevice_map: gpu\n",
            "m.yaml:4: `device_map`: Value error, 'gpu'",
            id="device",
        ),
        pytest.param(
            "base: b\nadapters: [a]\noutput: {path: o, max_shard_size: 5XB}\n",
            "m.yaml:3: `output.max_shard_size`",
            id="size",
        ),
        pytest.param(
            "base: {path: b, revision: abc}\nadapters: [a]\noutput: o\n",
            "`revision` goes with `id`",
            id="revision-without-id",
        ),
        pytest.param("base: b\nadapters: [a\n", "m.yaml:3: YAML syntax error", id="syntax"),
        pytest.param("", "m.yaml: the manifest is empty", id="empty"),
        pytest.param("- a\n- b\n", "m.yaml:1: a manifest is a YAML mapping", id="not-mapping"),
        pytest.param(
            "base: !!python/object/apply:os.system [echo hi]\nadapters: [a]\noutput: o\n",
            "m.yaml:1: YAML tag `tag:yaml.org,2002:python/object/apply:os.system` is not allowed",
            id="tag",
        ),
        pytest.param("base: b\nbase: c\nadapters: [a]\noutput: o\n", "m.yaml:2: duplicate key `base`", id="duplicate"),
        pytest.param(
            "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
            "more than 10000 YAML nodes",
            id="alias-bomb",
        ),
    ],
)
def test_bad_manifests_name_key_and_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, text))
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("200KB", 200_000), ("2GiB", 2 * 2**30), (1024, 1024), ("1.5MB", 1_500_000)]
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_schema_command_prints_the_json_schema() -> None:
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert set(schema["required"]) == {"base", "adapters", "output"}
    assert schema["additionalProperties"] is False
    # the short forms are part of the schema: a bare string is a valid base
    assert any(alt.get("type") == "string" for alt in schema["properties"]["base"]["anyOf"])
