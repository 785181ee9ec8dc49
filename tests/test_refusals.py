"""Inputs that cannot be merged correctly are refused with an InputError naming the problem,
and nothing is written."""

from __future__ import annotations

import pytest

from builders import ADAPTERS, REFUSALS
from helpers import write_manifest


def _merge(zoo, tmp_path, adapter: str):
    from mergekit_lite import run_merge

    manifest = write_manifest(tmp_path, zoo.base(ADAPTERS[adapter].base), [(zoo.adapter(adapter), 1.0)], "float32")
    return manifest, lambda: run_merge(manifest)


@pytest.mark.parametrize("adapter", sorted(REFUSALS))
def test_refused_with_input_error(adapter, zoo, tmp_path):
    from mergekit_lite.errors import InputError, MergekitError

    assert issubclass(InputError, MergekitError)
    manifest, run = _merge(zoo, tmp_path, adapter)
    with pytest.raises(InputError) as info:
        run()
    message = str(info.value).lower()
    missing = [word for word in REFUSALS[adapter] if word not in message]
    assert not missing, f"message does not name {missing}: {info.value}"
    assert not (tmp_path / "out").exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != manifest.name)
    assert not leftovers, f"a refused merge wrote {leftovers}"


def test_refusal_control_valid_adapter_merges(zoo, tmp_path):
    """Negative control: the same setup with a plain LoRA adapter is accepted and writes."""
    _, run = _merge(zoo, tmp_path, "llama_lora")
    out = run()
    assert out.exists() and (tmp_path / "out").exists()
