"""Session-scoped fixtures: the model zoo, the merges under test, and the PEFT oracle.

Everything expensive is built once per session and cached: each base and adapter (``Zoo``),
each (case, dtype) merge (``Merger``) and each PEFT reference (``Oracle``).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
# a suite run inside CI must not see CI's variables: tests that want them set them (test_ci.py)
for _name in ("CI", "GITHUB_ACTIONS", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "TQDM_DISABLE"):
    os.environ.pop(_name, None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the input-digest cache (mergekit_lite/io/digests.py) of this test session, never the user's
os.environ["MERGEKIT_LITE_CACHE"] = __import__("tempfile").mkdtemp(prefix="mergekit-lite-digests-")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from builders import CASES_BY_ID, MergeCase, Zoo, load_base  # noqa: E402
from helpers import (  # noqa: E402
    DTYPES,
    attach_adapters,
    dora_scaled_bases,
    load_folder_tensors,
    logits,
    merged_state_dict,
    shard_size_for,
    untie_embeddings,
    write_manifest,
)

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


class Merger:
    """Runs ``run_merge`` once per (case, dtype, base kind) and remembers the result or error."""

    def __init__(self, zoo: Zoo, root: Path) -> None:
        self.zoo = zoo
        self.root = root
        self._done: dict[tuple[str, str, str], Path | BaseException] = {}

    def output(self, case: MergeCase, dtype_name: str, base_kind: str | None = None) -> Path:
        base_kind = base_kind or case.base
        key = (case.id, dtype_name, base_kind)
        if key not in self._done:
            folder = self.root / f"{case.id}-{dtype_name}-{base_kind}"
            manifest = write_manifest(
                folder,
                self.zoo.base(base_kind),
                [(self.zoo.adapter(name), weight) for name, weight in case.adapters],
                dtype_name,
                max_shard_size=shard_size_for(dtype_name),
            )
            try:
                from mergekit_lite import run_merge

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = run_merge(manifest)
                self._done[key] = Path(result)
            except Exception as exc:  # remembered so that every test of this merge reports it
                self._done[key] = exc
        result = self._done[key]
        if isinstance(result, BaseException):
            raise result
        return result


class Oracle:
    """PEFT itself, with results cached per case and dtype."""

    def __init__(self, zoo: Zoo) -> None:
        self.zoo = zoo
        self._refs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # also magnitudes
        self._logits: dict[str, torch.Tensor] = {}

    def _adapters(self, case: MergeCase, upto: int | None = None) -> list[tuple[Path, float]]:
        return [(self.zoo.adapter(name), 1.0 if weight is None else weight) for name, weight in case.adapters[:upto]]

    def base_tensors(self, case: MergeCase) -> dict[str, torch.Tensor]:
        """The base checkpoint's tensors (float32); a tied lm_head is listed under its own name."""
        tensors = load_folder_tensors(self.zoo.base(case.base))
        if case.tied_pair and case.tied_pair[1] not in tensors:
            tensors[case.tied_pair[1]] = tensors[case.tied_pair[0]]
        return tensors

    def magnitudes(self, case: MergeCase) -> dict[str, torch.Tensor]:
        """Per tensor, elementwise, the largest magnitude that PEFT rounds on its way to the
        merged tensor: the base |W|; each adapter's delta and each partial sum (PEFT rounds
        after every adapter, and rounds an embedding delta before adding it); and for DoRA
        |f W| with f = m / ||W + dW|| (DoRA scales PEFT's rounding of the base by f).
        The tolerance table allows a number of ulps of this magnitude."""
        key = ("magnitudes", case.id)
        if key not in self._refs:
            base = self.base_tensors(case)
            mags = {k: v.abs() for k, v in base.items()}

            def widen(name: str, value: torch.Tensor) -> None:
                if name in mags and mags[name].shape == value.shape:
                    mags[name] = torch.maximum(mags[name], value.abs().to(mags[name].dtype))

            untie = case.oracle == "untie_first"
            model, _ = self.peft_model(case, torch.float32, untie=untie)
            for name, scaled in dora_scaled_bases(model).items():
                widen(name, scaled)
            previous = base
            for upto in range(1, len(case.adapters) + 1):
                model, names = self.peft_model(case, torch.float32, untie=untie, upto=upto)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    partial = merged_state_dict(model, names)
                for name, value in partial.items():
                    widen(name, value)
                    if name in previous and previous[name].shape == value.shape:
                        widen(name, value - previous[name])
                previous = partial
            self._refs[key] = mags
        return self._refs[key]

    def base_names(self, case: MergeCase) -> set[str]:
        return set(load_folder_tensors(self.zoo.base(case.base)))

    def peft_model(self, case: MergeCase, dtype: torch.dtype, untie: bool = False, upto: int | None = None):
        """The unmerged PeftModel of the case (its first ``upto`` adapters), and adapter names."""
        base = load_base(self.zoo.base(case.base), dtype=dtype, resize_to=case.resize_to)
        if untie:
            untie_embeddings(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return attach_adapters(base, self._adapters(case, upto))

    def merged(self, case: MergeCase, dtype_name: str) -> dict[str, torch.Tensor]:
        """PEFT's merged state dict (all names, tied ones included), per the case's oracle."""
        key = (case.id, dtype_name)
        if key not in self._refs:
            model, names = self.peft_model(case, DTYPES[dtype_name], untie=case.oracle == "untie_first")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._refs[key] = merged_state_dict(model, names)
        return self._refs[key]

    def expect_untied(self, case: MergeCase) -> bool:
        """Whether the output must store its own lm_head and set tie_word_embeddings false."""
        if case.tied_pair is None:
            return False
        ref = self.merged(case, "float32")
        embed, head = case.tied_pair
        differ = not torch.equal(ref[embed], ref[head])
        if case.oracle == "untie_first":
            assert differ, f"{case.id}: the adapter should make embedding and lm_head differ"
        return differ

    def expected_names(self, case: MergeCase) -> set[str]:
        names = self.base_names(case)
        if case.tied_pair and self.expect_untied(case):
            names.add(case.tied_pair[1])
        return names

    def reference(self, case: MergeCase, dtype_name: str) -> dict[str, torch.Tensor]:
        """The expected output tensors: PEFT's merge restricted to the expected names."""
        merged = self.merged(case, dtype_name)
        return {name: merged[name] for name in sorted(self.expected_names(case))}

    def input_ids(self, case: MergeCase) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)
        return torch.randint(0, case.vocab, (3, 12), generator=gen)

    def unmerged_logits(self, case: MergeCase) -> torch.Tensor:
        """Logits of the unmerged PeftModel (float32, adapters active and scaled)."""
        if case.id not in self._logits:
            model, _ = self.peft_model(case, torch.float32)
            self._logits[case.id] = logits(model, self.input_ids(case))
        return self._logits[case.id]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def qzoo(tmp_path_factory):
    """Tiny Llamas quantized by bitsandbytes (tests/quantized_builders.py)."""
    from quantized_builders import QuantZoo

    return QuantZoo(tmp_path_factory.mktemp("quantized"))


@pytest.fixture(scope="session")
def merger(zoo, tmp_path_factory) -> Merger:
    return Merger(zoo, tmp_path_factory.mktemp("merges"))


@pytest.fixture(scope="session")
def oracle(zoo) -> Oracle:
    return Oracle(zoo)


@pytest.fixture
def case(request) -> MergeCase:
    return CASES_BY_ID[request.param]
