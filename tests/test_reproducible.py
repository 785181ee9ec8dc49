"""Reproducible bytes: the same inputs give the same shards whatever the machine does.

Each merge runs in its own process with a different row-block size, thread count, executor and
CPU dispatch (MKL's instruction set, PyTorch's kernel capability), as another machine would;
the SHA-256 of every weight file must agree. The model is larger than the zoo's so that its
GEMMs take different kernel paths for different block shapes (the bug this guards: float32
BLAS sums in a shape- and CPU-dependent order).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from helpers import write_manifest

RUN = """
import sys
import mergekit_lite.merge.merge as merge
merge.ROW_BLOCK = int(sys.argv[1])
from mergekit_lite.cli import main
main(["merge", sys.argv[2], "--no-verify", "--quiet"])
"""

VARIANTS = {  # name: (row block, environment, executor)
    "reference": (2**17, {}, None),
    "small-blocks-1-thread-sse": (1000, {"OMP_NUM_THREADS": "1", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                                         "ATEN_CPU_CAPABILITY": "default"}, None),
    "odd-blocks-3-threads-avx2": (50_000, {"OMP_NUM_THREADS": "3", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                           "ATEN_CPU_CAPABILITY": "avx2"}, None),
    "processes-avx512": (2**15, {"MKL_ENABLE_INSTRUCTIONS": "AVX512"}, {"kind": "processes", "workers": 2}),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[tuple[Path, float]]]:
    """A one-layer Llama with 320-wide attention and an 864-wide MLP, and two adapters (r=16, and
    rsLoRA r=8 on fewer modules) that overlap on q_proj and down_proj."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("reproducible")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=320, intermediate_size=864, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    adapters = []
    for i, (extra, targets) in enumerate([({}, "all-linear"), ({"use_rslora": True}, ["q_proj", "down_proj"])]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                                   LoraConfig(r=16 // (i + 1), lora_alpha=24, target_modules=targets,
                                              init_lora_weights=False, **extra))
        model.save_pretrained(root / f"adapter{i}")
        adapters.append((root / f"adapter{i}", (1.0, -0.7)[i]))
    return root / "base", adapters


def _merge(tmp_path: Path, inputs, dtype: str, variant: str, scale: float = 1.0) -> dict[str, str]:
    block, env, executor = VARIANTS[variant]
    base, adapters = inputs
    folder = tmp_path / f"{variant}-{dtype}-{scale}"
    manifest = write_manifest(folder, base, [(p, w * scale) for p, w in adapters], dtype, max_shard_size="400KB")
    if executor is not None:
        data = yaml.safe_load(manifest.read_text())
        manifest.write_text(yaml.safe_dump({**data, "executor": executor}, sort_keys=False))
    done = subprocess.run([sys.executable, "-c", RUN, str(block), str(manifest)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shards = sorted((folder / "out").glob("model*.safetensors"))
    assert len(shards) > 1
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_same_bytes_on_any_blocking_threads_executor_and_cpu_dispatch(tmp_path, inputs, dtype) -> None:
    reference = _merge(tmp_path, inputs, dtype, "reference")
    for variant in [v for v in VARIANTS if v != "reference"]:
        assert _merge(tmp_path, inputs, dtype, variant) == reference, variant
    # negative control: the comparison sees a change of one part in 2^20 of the adapters' weights
    assert _merge(tmp_path, inputs, dtype, "reference", scale=1 + 2.0**-20) != reference
