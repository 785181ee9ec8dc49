"""CI-native output: --json on every command, progress only on a terminal, exit 75 for a busy
output, stable check ids in verification.json, GitHub Actions annotations, outputs and summary,
and the sample workflow of docs/ci.md run with the Actions variables set."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite import __version__
from mergekit_lite.cli import main
from mergekit_lite.gate.report import GateReport, check_id
from mergekit_lite.outcome.actions import annotations, summary
from mergekit_lite.outcome.document import VERDICTS, Outcome
from mergekit_lite.outcome.progress import ByteProgress, bars_wanted
from mergekit_lite.release.publish import output_lock
from mergekit_lite.tools import example

from release_builders import build_adapter, build_chat_base, build_tokenizer, write_manifest

REPO = Path(__file__).resolve().parent.parent
QUICK = {"logits": False}  # structure, algebra, packaging: enough for what these tests look at
IMPOSSIBLE = {"max_new_tokens": 2, "thresholds": {"top1_agreement": 1.1}}  # a gate that must fail
ID = re.compile(r"^[a-z_]+\.[a-z0-9_]+$")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ci-inputs")
    base = build_chat_base(root / "base", build_tokenizer())
    return base, build_adapter(base, root / "adapter", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def cli(*args: str, env: dict[str, str] | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(main, list(args), env=env)


def document(result) -> dict:
    """The one JSON document on stdout (nothing else may be there)."""
    doc = json.loads(result.stdout)
    assert doc["format"] == "mergekit-lite/outcome/1" and doc["tool"] == {
        "name": "mergekit-lite",
        "version": __version__,
    }
    assert doc["exit_code"] == result.exit_code == VERDICTS[doc["verdict"]][0]
    return doc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- --json on every command


@pytest.fixture(scope="module")
def published(inputs, tmp_path_factory) -> tuple[Path, dict]:
    """A release merged with --json (CI=true: no bars) and the document it printed."""
    base, adapter = inputs
    folder = tmp_path_factory.mktemp("ci-published")
    m = write_manifest(folder, base, [adapter], "bfloat16", verify={"max_new_tokens": 2})
    result = cli("merge", str(m), "--json", env={"CI": "true"})
    assert result.exit_code == 0, result.output
    return m, document(result) | {"_stderr": result.stderr}


def test_merge_json_published(published) -> None:
    m, doc = published
    release = (m.parent / "out").resolve()
    assert doc["command"] == "merge" and doc["verdict"] == "published" and doc["error"] is None
    assert doc["release"] == str(release) and doc["rejected"] is None
    assert doc["digest"] == "sha256:" + sha256(release / "SHA256SUMS")
    gate = doc["gate"]
    assert gate == json.loads((release / "verification.json").read_text()) | {"timestamp": gate["timestamp"]}
    assert gate["verdict"] == "passed" and gate["failed"] == []
    assert {c["group"] for c in gate["checks"]} == {"structure", "algebra", "end_to_end", "packaging"}
    assert set(doc["timings"]) == {"plan", "merge", "package", "verify", "describe", "publish", "total"}
    assert all(isinstance(v, int | float) and v >= 0 for v in doc["timings"].values())
    assert set(gate["timings"]) == {"structure", "algebra", "end_to_end", "packaging"}
    # the words for people went to stderr: the plan, the gate's table, the published line
    assert "model.layers.0.self_attn.q_proj.weight" in doc["_stderr"] and f"published {release}" in doc["_stderr"]


def test_verification_json_has_stable_ids_numbers_time_and_version(published) -> None:
    m, _ = published
    verification = json.loads((m.parent / "out" / "verification.json").read_text())
    assert verification["schema"] == "mergekit-lite/verification/1" and verification["tool"]["version"] == __version__
    assert verification["timestamp"].endswith("+00:00")
    ids = [c["id"] for c in verification["checks"]]
    assert len(ids) == len(set(ids)) and all(ID.match(i) for i in ids), ids
    assert {"algebra.residual_rms", "algebra.residual_max", "algebra.unchanged_tensors_equal_the_base"} <= set(ids)
    assert "end_to_end.top1_agreement" in ids and "structure.no_nan_or_inf" in ids
    for c in verification["checks"]:
        assert c["figure"] is None or type(c["figure"]) in (int, float), c
        assert c["threshold"] is None or type(c["threshold"]) in (int, float), c
        assert c["figure"] is not None or c["figure_text"] is not None, c  # nothing measured is lost
    texts = {c["id"]: c["figure_text"] for c in verification["checks"] if c["figure_text"] is not None}
    assert texts["packaging.chat_template_as_the_source"] == "present"


@pytest.mark.parametrize(
    "name, same",
    [
        ("210 unchanged tensors equal the base", "7 unchanged tensors equal the base"),
        ("W'x residual, RMS ulps (210 changed tensors)", "W'x residual, RMS ulps (3 changed tensors)"),
        ("residual within 1.5 ulps", "residual within 2 ulps"),
    ],
)
def test_check_ids_do_not_carry_counts(name: str, same: str) -> None:
    assert check_id("algebra", name) == check_id("algebra", same)
    # negative control: different checks get different ids, and the group is part of it
    assert check_id("algebra", name) != check_id("algebra", "shapes as planned")
    assert check_id("algebra", name) != check_id("structure", name)


def test_a_duplicate_check_id_is_refused() -> None:
    report = GateReport(dtype="F32")
    report.add("structure", "3 shapes as planned", True)
    report.add("structure", "shapes as planned, again", True)  # control: another id is fine
    with pytest.raises(ValueError, match="share the id `structure.shapes_as_planned`"):
        report.add("structure", "4 shapes as planned", True)


def test_a_group_that_cannot_run_twice_fails_twice_with_two_ids() -> None:
    from mergekit_lite.gate import _guarded

    def broken() -> None:
        raise OSError("unreadable")

    report = GateReport(dtype="F32")
    _guarded(report, "packaging", broken)
    _guarded(report, "packaging", lambda: report.add("packaging", "fine", True))  # control: no failure added
    _guarded(report, "packaging", broken)
    assert [(c.id, c.passed) for c in report.checks] == [
        ("packaging.checks_could_run", False),
        ("packaging.fine", True),
        ("packaging.checks_could_run_2", False),
    ]
    # a check that reuses an id is itself caught and fails its group: the gate never passes by accident
    _guarded(report, "packaging", lambda: report.add("packaging", "fine", True))
    assert report.checks[-1].id == "packaging.checks_could_run_3" and "share the id" in report.checks[-1].detail


def test_every_command_takes_json() -> None:
    commands = [(name,) for name in main.commands if name != "example"] + [("example", "prepare")]
    for command in commands:
        result = cli(*command, "--help")
        assert result.exit_code == 0 and "--json" in result.output, command


def test_plan_json(inputs, tmp_path: Path) -> None:
    base, adapter = inputs
    m = write_manifest(tmp_path, base, [adapter], "float32")
    doc = document(cli("plan", str(m), "--json"))
    assert doc["command"] == "plan" and doc["verdict"] == "planned" and doc["digest"] is None
    assert any(t["ops"] for t in doc["tensors"]) and doc["total_bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"]


def test_merge_json_unverified(inputs, tmp_path: Path) -> None:
    base, adapter = inputs
    m = write_manifest(tmp_path, base, [adapter], "float32", verify=IMPOSSIBLE)
    doc = document(cli("merge", str(m), "--json", "--no-verify"))
    assert doc["verdict"] == "unverified" and doc["gate"] is None and doc["skipped_because"] == "--no-verify"
    assert doc["digest"] == "sha256:" + sha256(tmp_path / "out" / "SHA256SUMS")
    assert json.loads((tmp_path / "out" / "verification.json").read_text())["verdict"] == "skipped"


def test_merge_json_rejected_keeps_the_report_with_the_candidate(inputs, tmp_path: Path) -> None:
    base, adapter = inputs
    m = write_manifest(tmp_path, base, [adapter], "float32", verify=IMPOSSIBLE)
    result = cli("merge", str(m), "--json", "--keep-rejected")
    doc = document(result)
    rejected = (tmp_path / "out.rejected").resolve()
    assert doc["verdict"] == "rejected" and doc["exit_code"] == 1 and doc["digest"] is None
    assert doc["rejected"] == str(rejected) and not (tmp_path / "out").exists()
    assert doc["gate"]["failed"] == ["end_to_end.top1_agreement"]
    assert "nothing was published" in doc["error"]
    kept = json.loads((rejected / "verification.json").read_text())
    assert kept["verdict"] == "failed" and kept["failed"] == ["end_to_end.top1_agreement"]
    # the terminal (stderr with --json): the verdict first, then "nothing published", then the failing row
    lines = result.stderr.splitlines()
    head = lines.index(next(line for line in lines if "verification FAILED" in line))
    assert lines[head] == f"out: verification FAILED (1 of {len(kept['checks'])} checks)"
    assert lines[head + 1].startswith("nothing published; the rejected candidate and its verification.json are at")
    assert lines[head + 3].startswith("FAIL  end_to_end: top1_agreement"), lines[head : head + 4]


def test_merge_json_input_error(inputs, tmp_path: Path) -> None:
    base, adapter = inputs
    m = write_manifest(tmp_path, base, [adapter], "float32")
    m.write_text(m.read_text() + "outptu: x\n")
    result = cli("merge", str(m), "--json")
    doc = document(result)
    assert doc["verdict"] == "input_error" and doc["exit_code"] == 2 and doc["release"] is None
    assert "unknown key `outptu`" in doc["error"]
    assert result.stderr.strip().splitlines() == ["error: " + doc["error"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"]


def test_verify_json(published, tmp_path: Path) -> None:
    m, _ = published
    release = (m.parent / "out").resolve()
    doc = document(cli("verify", str(m), "--json"))
    assert doc["command"] == "verify" and doc["verdict"] == "passed" and doc["release"] == str(release)
    assert doc["digest"] == "sha256:" + sha256(release / "SHA256SUMS")
    assert doc["gate"]["verdict"] == "passed" and set(doc["gate"]["timings"]) <= set(doc["timings"])
    broken = tmp_path / "broken"
    __import__("shutil").copytree(release, broken)
    (broken / "tokenizer.json").unlink()
    bad = cli("verify", str(m), "--against", str(broken), "--json")
    doc = document(bad)
    assert doc["verdict"] == "rejected" and doc["exit_code"] == 1 and doc["digest"] is None
    assert doc["gate"]["failed"] and all(ID.match(i) for i in doc["gate"]["failed"])
    # same heading for merge and verify of one release: "<name>: verification <VERDICT>"
    lines = bad.stderr.splitlines()
    heading = next(i for i, line in enumerate(lines) if ": verification " in line)
    assert lines[heading].startswith("broken: verification FAILED") and lines[heading + 2].startswith("FAIL  ")
    same = cli("verify", str(m), "--against", str(release))
    assert same.stdout.splitlines()[0] == "out: verification PASSED"
    assert "out: verification PASSED" in published[1]["_stderr"]


def test_diff_schema_and_example_json(inputs, tmp_path: Path) -> None:
    base, _ = inputs
    doc = document(cli("diff", str(base), str(base), "--json"))
    assert doc["verdict"] == "ok" and doc["rows"] and all(r["relative"] == 0 for r in doc["rows"])
    doc = document(cli("schema", "--json"))
    assert doc["manifest_schema"] == json.loads(cli("schema").stdout)
    cache = tmp_path / "cache"  # an example cache already prepared: nothing is converted or trained
    for folder, marker in (
        (example.BASE_NAME, "config.json"),
        (example.ADAPTER_NAME, "adapter_config.json"),
        (example.SECOND_ADAPTER_NAME, "adapter_config.json"),
    ):
        (cache / folder).mkdir(parents=True)
        (cache / folder / marker).write_text("{}")
    doc = document(cli("example", "prepare", "--cache", str(cache), "--json"))
    assert doc["base"] == str(cache / example.BASE_NAME) and doc["adapter"] == str(cache / example.ADAPTER_NAME)
    missing = document(cli("diff", str(base), str(tmp_path / "nowhere"), "--json"))
    assert missing["verdict"] == "input_error" and "is not a checkpoint folder" in missing["error"]


# --------------------------------------------------------------------------- a busy output: exit 75


def test_busy_output_is_exit_75_before_the_plan(inputs, tmp_path: Path) -> None:
    base, adapter = inputs
    m = write_manifest(tmp_path, base, [adapter], "float32", verify=QUICK)
    output = (tmp_path / "out").resolve()
    with output_lock(output):
        result = cli("merge", str(m), "--json")
        plain = cli("merge", str(m))
    doc = document(result)
    assert doc["verdict"] == "busy" and doc["exit_code"] == 75
    assert "is being written by another run" in doc["error"]
    assert plain.exit_code == 75 and plain.stdout == "", "no plan and no bar before the lock is known to be free"
    assert plain.stderr.strip().splitlines() == [f"error: {doc['error']}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"]
    # control: once the lock is free the same command publishes
    assert cli("merge", str(m), "-q").exit_code == 0


# --------------------------------------------------------------------------- progress


@pytest.mark.parametrize(
    "choice, tty, env, wanted",
    [
        (None, True, {}, True),  # the control: a terminal gets bars
        (None, False, {}, False),  # a log file or a pipe does not
        (None, True, {"CI": "true"}, False),
        (None, True, {"CI": "false"}, True),
        (None, True, {"TQDM_DISABLE": "1"}, False),
        (None, True, {"TQDM_DISABLE": "0"}, True),
        (True, False, {"CI": "true", "TQDM_DISABLE": "1"}, True),  # --progress wins
        (False, True, {}, False),  # --no-progress wins
    ],
)
def test_bars_only_on_a_terminal(choice, tty: bool, env: dict, wanted: bool) -> None:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert bars_wanted(choice, Stream(), env) is wanted


def test_progress_in_a_log_is_ten_lines() -> None:
    lines, off = io.StringIO(), io.StringIO()
    for stream, mode in ((lines, "lines"), (off, "off")):
        progress = ByteProgress(1000, "merging", stream, mode)
        for _ in range(100):
            progress.update(10)
        progress.close()
    assert [line.split(" (")[0] for line in lines.getvalue().splitlines()] == [
        f"merging: {p}%" for p in range(10, 101, 10)
    ]
    assert "\r" not in lines.getvalue() and off.getvalue() == ""


def test_merge_progress_bar_only_when_asked(inputs, tmp_path: Path) -> None:
    base, adapter = inputs
    m = write_manifest(tmp_path, base, [adapter], "float32", verify=QUICK, overwrite=True)
    logged = cli("merge", str(m), env={"CI": "true"})  # the CliRunner's stderr is no terminal either
    assert logged.exit_code == 0, logged.output
    assert "\r" not in logged.stderr and "merging: 100%" in logged.stderr
    for line in ("merge done in ", "gate: algebra checks done in ", "verify done in ", "publish done in "):
        assert line in logged.stderr, logged.stderr  # a line per stage: no long silent stretch
    quiet = cli("merge", str(m), "-q", env={"CI": "true"})
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr  # control: -q prints none of it
    forced = cli("merge", str(m), "--progress", env={"CI": "true", "TQDM_DISABLE": "1"})
    assert forced.exit_code == 0, forced.output
    assert "\r" in forced.stderr and "merging: 100%|" in forced.stderr  # tqdm's bar, as asked


# --------------------------------------------------------------------------- third-party noise


def test_third_party_warnings_are_silenced(capsys) -> None:
    assert cli("schema").exit_code == 0  # the CLI's group callback silences them
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: offline"
    )
    logging.getLogger("transformers.generation.utils").warning("generation flags are not valid")
    logging.getLogger("mergekit_lite.sources").warning("our own warning")  # control: ours still show
    err = capsys.readouterr().err
    assert "gemm_4bit_forward" not in err and "generation flags" not in err
    assert "our own warning" in err


BNB_PROBE = """
import importlib.abc, importlib.util, json, sys

class AVX512BF16(importlib.abc.MetaPathFinder):
    # bitsandbytes believes the CPU has AVX512-BF16, as on the machines that print the message
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, AVX512BF16())
from mergekit_lite.cli import main
main(["schema"], standalone_mode=False)  # the CLI's start, as every command has it
import bitsandbytes.backends.cpu.ops as ops
print(json.dumps({"failed_branch_ran": getattr(ops, "gemm_4bit_forward_kernel", "absent") is None}))
"""


def test_bitsandbytes_import_message_is_silenced(tmp_path: Path) -> None:
    """The real message: bitsandbytes' CPU backend, made to take its AVX512-BF16 branch, fails to load
    the kernels-community kernel and logs; under the CLI nothing reaches stderr."""
    pytest.importorskip("bitsandbytes")
    probe = tmp_path / "probe.py"
    probe.write_text(BNB_PROBE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # control: the branch that logs "Failed to load CPU gemm_4bit_forward from kernels-community" ran
    assert json.loads(done.stdout.splitlines()[-1]) == {"failed_branch_ran": True}
    assert "gemm_4bit_forward" not in done.stderr and "kernels" not in done.stderr, done.stderr


# --------------------------------------------------------------------------- GitHub Actions


def actions_env(tmp_path: Path) -> dict[str, str]:
    for name in ("output", "summary"):
        (tmp_path / name).write_text("")
    return {
        "GITHUB_ACTIONS": "true",
        "CI": "true",
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary"),
    }


def read_outputs(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_actions_input_error_gets_a_summary_an_error_and_outputs(tmp_path: Path) -> None:
    env = actions_env(tmp_path)
    result = cli("merge", str(tmp_path / "no-such-manifest.yaml"), env=env)
    assert result.exit_code == 2
    assert result.stdout.splitlines()[-1].startswith("::error title=mergekit-lite merge::")
    text = (tmp_path / "summary").read_text()
    assert text.splitlines()[0] == "## ⛔ mergekit-lite merge: INPUT ERROR; nothing written"
    assert read_outputs(tmp_path / "output") == {
        "verdict": "input_error",
        "exit-code": "2",
        "release": "",
        "digest": "",
        "rejected": "",
        "report": "",
    }
    schema = cli("schema", env=env)  # control: a command with nothing to summarise adds no summary
    assert schema.exit_code == 0 and (tmp_path / "summary").read_text() == text


def test_actions_unverified_publish_says_so_first(inputs, tmp_path: Path) -> None:
    base, adapter = inputs
    env = actions_env(tmp_path)
    m = write_manifest(tmp_path, base, [adapter], "float32")
    result = cli("merge", str(m), "--no-verify", env=env)
    assert result.exit_code == 0 and "::error" not in result.output
    first = (tmp_path / "summary").read_text().splitlines()[0]
    assert first == "## ⚠️ mergekit-lite merge `out`: published NOT VERIFIED (gate skipped)"
    outputs = read_outputs(tmp_path / "output")
    assert outputs["verdict"] == "unverified" and outputs["digest"] == "sha256:" + sha256(
        tmp_path / "out" / "SHA256SUMS"
    )


def test_annotations_escape_and_name_each_failed_check() -> None:
    report = GateReport(dtype="F32")
    report.add("structure", "shapes as planned", True)
    report.add("structure", "no NaN or Inf", False, figure=2, threshold=0, detail="a.weight, b: 100%\nnext")
    outcome = Outcome("verify", report=report)
    outcome.fail("verification failed", 1)
    assert annotations(outcome) == [
        "::error title=mergekit-lite verify%3A structure.no_nan_or_inf::"
        "structure: no NaN or Inf = 2 (threshold 0); a.weight, b: 100%25%0Anext"
    ]
    assert summary(outcome).splitlines()[0] == "## ❌ mergekit-lite verify: REJECTED by the gate; nothing published"


# --------------------------------------------------------------------------- docs/ci.md's workflow


def workflow_steps() -> list[dict]:
    text = (REPO / "docs" / "ci.md").read_text()
    block = re.search(r"```yaml\n(name: release.*?)```", text, re.S)
    assert block, "docs/ci.md has no sample workflow"
    return yaml.safe_load(block.group(1))["jobs"]["merge"]["steps"]


def run_workflow(folder: Path, bin_dir: Path) -> tuple[list[tuple[str, int, str]], dict[str, dict], str]:
    """Run the workflow's mergekit-lite steps as the runner would: bash -e, the Actions variables
    set, a fresh $GITHUB_OUTPUT per step, `${{ steps.merge.outputs.* }}` and `if:` read from them."""
    gh = folder / "gh"
    gh.mkdir()
    base_env = {**os.environ, **actions_env(gh), "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    base_env["PYTHONPATH"] = str(REPO) + os.pathsep + base_env.get("PYTHONPATH", "")
    ran: list[tuple[str, int, str]] = []
    outputs: dict[str, dict[str, str]] = {}
    for number, step in enumerate(workflow_steps()):
        script = step.get("run", "")
        if "mergekit-lite" not in script or script.startswith("pip install"):
            continue
        merge_outputs = outputs.get("merge", {})
        condition = step.get("if")
        if condition:
            wanted = re.fullmatch(r"steps\.merge\.outputs\.(\w+) == '(\w+)'", condition)
            assert wanted, f"the test reads only conditions on the merge step's outputs: {condition}"
            if merge_outputs.get(wanted.group(1)) != wanted.group(2):
                continue
        script = re.sub(
            r"\$\{\{ steps\.merge\.outputs\.([\w-]+) \}\}", lambda g, o=merge_outputs: o[g.group(1)], script
        )
        step_output = gh / f"output-{number}"
        step_output.write_text("")
        done = subprocess.run(
            ["bash", "-e", "-c", script],
            cwd=folder,
            env={**base_env, "GITHUB_OUTPUT": str(step_output)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        ran.append((step.get("name", ""), done.returncode, done.stdout + done.stderr))
        outputs[step.get("id", str(number))] = read_outputs(step_output)
        if done.returncode:
            break
    return ran, outputs, (gh / "summary").read_text()


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory) -> Path:
    """`mergekit-lite` on PATH, as `pip install` would put it, for this tree."""
    folder = tmp_path_factory.mktemp("bin")
    shim = folder / "mergekit-lite"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mergekit_lite "$@"\n')
    shim.chmod(0o755)
    return folder


def test_sample_workflow_publishes_and_verifies(inputs, bin_dir: Path, tmp_path: Path) -> None:
    base, adapter = inputs
    write_manifest(tmp_path, base, [adapter], "bfloat16", verify=QUICK, name="release.yaml")
    ran, outputs, text = run_workflow(tmp_path, bin_dir)
    assert [(name, code) for name, code, _ in ran] == [
        ("Merge, verify, publish", 0),
        ("Verify the published release again", 0),
    ], ran
    release = (tmp_path / "out").resolve()
    merge_out, verify_out = outputs["merge"], outputs[next(k for k in outputs if k != "merge")]
    assert merge_out["verdict"] == "published" and verify_out["verdict"] == "passed"
    assert merge_out["release"] == str(release) and merge_out["report"] == str(release / "verification.json")
    assert merge_out["digest"] == "sha256:" + sha256(release / "SHA256SUMS")
    merged, verified = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("merge", "verify"))
    assert merged["verdict"] == "published" and verified["verdict"] == "passed"
    assert merged["digest"] == verified["digest"] == merge_out["digest"] == verify_out["digest"]
    assert text.splitlines()[0] == "## ✅ mergekit-lite merge `out`: published"
    assert "## ✅ mergekit-lite verify `out`: verification passed" in text
    assert all("Failed to load" not in err and "\r" not in err for _, _, err in ran)


def test_sample_workflow_on_a_rejected_merge(inputs, bin_dir: Path, tmp_path: Path) -> None:
    base, adapter = inputs
    write_manifest(tmp_path, base, [adapter], "float32", verify=IMPOSSIBLE, name="release.yaml")
    ran, outputs, text = run_workflow(tmp_path, bin_dir)
    assert [(name, code) for name, code, _ in ran] == [("Merge, verify, publish", 1)], ran
    assert "::error title=mergekit-lite merge%3A end_to_end.top1_agreement::end_to_end: top1_agreement" in ran[0][2]
    assert outputs["merge"]["verdict"] == "rejected" and outputs["merge"]["exit-code"] == "1"
    assert outputs["merge"]["release"] == "" and outputs["merge"]["digest"] == ""
    assert text.splitlines()[0] == "## ❌ mergekit-lite merge `out`: REJECTED by the gate; nothing published"
    assert "| ❌ | end_to_end: top1_agreement |" in text
    assert json.loads((tmp_path / "merge.json").read_text())["verdict"] == "rejected"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gh", "merge.json", "release.yaml"]  # nothing published
