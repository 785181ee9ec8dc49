"""Faults during a real merge: the inputs never change, the output path holds the previous release
or a complete verified new one (never a mix, never nothing), the error is one clear line, and the
next run succeeds and leaves no staging, `.old` or lock debris.

Every run here is a real `python -m mergekit_lite merge` subprocess on a tiny Llama written as 13
shards (max_shard_size 8KB), replacing a previous release (bfloat16, one file) so that a mix of
the two would show. The gate runs with `verify.logits: false` (structure, per-tensor algebra,
packaging) to keep each run to a few seconds.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_lite.io.format import read_header
from mergekit_lite.release.publish import output_lock

from helpers import write_manifest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
SEED = 20251128
KILLS = 22  # scheduled; a run that finishes before its moment counts as a completed run, not a kill
INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- the rig


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str] | None:
    """relative path -> sha256 of every file under `folder`; None when it does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def rig_manifest(
    folder: Path,
    name: str,
    rig_inputs: dict[str, Path],
    dtype: str,
    output: str,
    max_shard_size: str | None = None,
    overwrite: bool = False,
) -> Path:
    """The rig's manifest `folder/name`: its base and adapter by absolute path, the gate's fast checks only."""
    return write_manifest(
        folder,
        rig_inputs["base"],
        [rig_inputs["adapter"]],
        dtype,
        output,
        max_shard_size or None,
        overwrite=overwrite,
        absolute=True,
        name=name,
        verify={"logits": False},
    )


def start(manifest: Path, **kwargs) -> subprocess.Popen:
    # SIGINT back to its default in the child: a test suite started in the background (`cmd &`,
    # nohup) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored, as it should
    then = kwargs.pop("preexec_fn", None)

    def prepare_child() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if then is not None:
            then()

    return subprocess.Popen(
        [sys.executable, "-m", "mergekit_lite", "merge", "-q", str(manifest)],
        cwd=manifest.parent,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=prepare_child,
        **kwargs,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def one_error_line(stderr: str) -> str:
    """The single `error:` line, which must be the last line; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


class Rig:
    """Inputs (copied, hashed), a previous release, and a reference of the new one."""

    def __init__(self, root: Path, zoo) -> None:
        self.root = root
        self.inputs = {"base": root / "inputs" / "base", "adapter": root / "inputs" / "adapter"}
        shutil.copytree(zoo.base("llama"), self.inputs["base"])
        shutil.copytree(zoo.adapter("llama_lora"), self.inputs["adapter"])
        self.input_hashes = self.input_state()
        run = root / "run"
        run.mkdir()
        self.run = run
        self.previous_manifest = rig_manifest(run, "previous.yaml", self.inputs, "bfloat16", "out")
        self.manifest = rig_manifest(run, "merge.yaml", self.inputs, "float32", "out", "8KB", overwrite=True)
        ref_manifest = rig_manifest(run, "reference.yaml", self.inputs, "float32", "reference", "8KB")
        began = time.monotonic()
        code, _, err = finish(start(ref_manifest))
        first = time.monotonic() - began
        assert code == 0, err
        self.reference = run / "reference"
        self.shards = json.loads((self.reference / INDEX).read_text())["weight_map"]
        assert len(set(self.shards.values())) >= 10, "the new release should have many shards"
        began = time.monotonic()
        code, _, err = finish(start(self.previous_manifest))
        assert code == 0, err
        # one whole run: interpreter, plan, merge, gate, publish; the first run also fills the
        # architecture cache (checkpoint.py), which the runs under test then find
        self.duration = min(first, time.monotonic() - began)
        self.previous = tree(run / "out")
        assert "model.safetensors" in self.previous, "the previous release is a one-file bf16 release"

    def input_state(self) -> dict[str, str]:
        return {name: json.dumps(tree(path)) for name, path in self.inputs.items()}

    def complete_new(self, folder: Path) -> str | None:
        """None when `folder` is a complete verified new release, else what is wrong with it."""
        files = tree(folder)
        if files is None:
            return "nothing at the output path"
        if "SHA256SUMS" not in files:
            return "no SHA256SUMS"
        listed = dict(reversed(line.split("  ", 1)) for line in (folder / "SHA256SUMS").read_text().splitlines())
        if set(listed) | {"SHA256SUMS"} != set(files):
            return f"SHA256SUMS and the folder disagree: {sorted(set(listed) ^ set(files))}"
        if any(files[name] != digest for name, digest in listed.items()):
            return "a checksum does not match"
        if not json.loads((folder / "verification.json").read_text()).get("passed"):
            return "verification.json does not say passed"
        for shard in sorted(set(self.shards.values())) + [INDEX]:
            if files.get(shard) != sha256(self.reference / shard):
                return f"`{shard}` differs from the reference merge"
        for shard in set(self.shards.values()):
            read_header(folder / shard)  # strict: contiguous offsets, exact length, no duplicates
        return None

    def debris(self, name: str = "out") -> list[str]:
        return sorted(p.name for p in self.run.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def rig(tmp_path_factory, zoo) -> Rig:
    return Rig(tmp_path_factory.mktemp("faults"), zoo)


# --------------------------------------------------------------------------- SIGKILL at random moments


def staging_of(run: Path, name: str = "out", stale: frozenset[str] = frozenset()) -> Path | None:
    """The staging folder of the run in progress (not one a killed run left behind)."""
    for entry in os.scandir(run):
        if entry.name.startswith(f".{name}.") and entry.name.endswith(".staging") and entry.name not in stale:
            return Path(entry.path)
    return None


def moment_reached(kind: str, param: int, rig: Rig, out_inode: int | None, stale: frozenset[str]) -> bool:
    """Whether the run has reached the moment to kill it at, judged from what it has written."""
    if kind == "swapped":  # publish has put a new folder at the output path
        try:
            return os.stat(rig.run / "out").st_ino != out_inode
        except FileNotFoundError:
            return True
    stage = staging_of(rig.run, stale=stale)
    if stage is None:
        return False
    names = {
        "staging": None,  # the run holds the lock and has made its staging folder
        "shard": f"model-{param:05d}-of-{len(set(rig.shards.values())):05d}.safetensors",  # inside/after shard k
        "index": INDEX,  # every shard written
        "gate": "config.json",  # packaged; the gate runs next
        "describe": "verification.json",  # the gate passed; model card, receipt, checksums next
        "publish": "SHA256SUMS",  # complete; fsync and rename next
    }
    target = names[kind]
    return target is None or (stage / target).exists()


def schedule(rnd: random.Random, shards: int) -> list[tuple[str, float]]:
    """Where each run is killed: at a random time of a whole run, or just after a step, with jitter."""
    plan: list[tuple[str, float]] = [("time", rnd.uniform(0.05, 0.9)) for _ in range(6)]
    plan += [
        ("staging", 0),
        ("staging", 0),
        ("index", 0),
        ("index", 0),
        ("gate", 0),
        ("gate", 0),
        ("describe", 0),
        ("describe", 0),
        ("publish", 0),
        ("publish", 0),
        ("publish", 0),
        ("swapped", 0),
    ]
    plan += [("shard", rnd.randint(1, shards)) for _ in range(KILLS - len(plan))]
    rnd.shuffle(plan)
    return plan


def test_sigkill_at_random_moments_never_leaves_a_wrong_release(rig: Rig) -> None:
    rnd = random.Random(SEED)
    out = rig.run / "out"
    tally: Counter[str] = Counter()
    log: list[str] = []
    wrong: list[str] = []
    plan = schedule(rnd, len(set(rig.shards.values())))
    for i, (kind, param) in enumerate(plan):
        before = tree(out)
        inode = os.stat(out).st_ino if out.exists() else None
        stale = frozenset(rig.debris())
        began = time.monotonic()
        proc = start(rig.manifest)
        deadline = began + (param * rig.duration if kind == "time" else 120)
        while proc.poll() is None and time.monotonic() < deadline:
            if kind != "time" and moment_reached(kind, int(param), rig, inode, stale):
                time.sleep(rnd.uniform(0, 0.003))
                break
            time.sleep(0.0005)
        killed = proc.poll() is None
        if killed:
            proc.kill()
        code, _, err = finish(proc)
        tally["kills" if killed else "completed"] += 1
        if not killed:
            assert code == 0, err
        now = tree(out)
        problem = None if now == before else rig.complete_new(out)
        outcome = "previous" if now == before else ("new" if problem is None else f"WRONG ({problem})")
        tally[outcome.split(" ")[0]] += 1
        log.append(
            f"{i:2d} {kind}{'' if kind != 'shard' else int(param)} at {time.monotonic() - began:5.2f}s "
            f"{'killed' if killed else 'finished'} -> {outcome}; left {rig.debris()}"
        )
        if problem is not None and now != before:
            wrong.append(log[-1])
        assert rig.input_state() == rig.input_hashes, f"an input changed after run {i}"
        if i == len(plan) // 2:  # a rerun halfway recovers and cleans up (and the last run below)
            code, _, err = finish(start(rig.manifest))
            assert code == 0, err
            assert rig.complete_new(out) is None and rig.debris() == []
    code, _, err = finish(start(rig.manifest))
    assert code == 0, err
    summary = "\n".join(log + [f"tally: {dict(tally)}"])
    print(summary)
    assert not wrong, summary
    assert rig.complete_new(out) is None, summary
    assert rig.debris() == [], summary
    assert tally["kills"] >= 20, summary


CHILD = """
import os, signal, sys
import mergekit_lite.release.publish as publish

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "after-exchange":  # the atomic swap is done; cleanup of the old release is not
    real = publish._exchange
    def exchange(a, b):
        done = real(a, b)
        if done:
            die()
        return done
    publish._exchange = exchange
else:  # a system without renameat2: publish falls back on two renames; die between them
    publish._exchange = lambda a, b: False
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(".old"):
            die()
    os.rename = rename

from mergekit_lite.cli import main
main(["merge", "-q", sys.argv[2]])
"""


@pytest.mark.parametrize("moment", ["after-exchange", "between-two-renames"])
def test_sigkill_inside_publish(rig: Rig, tmp_path: Path, moment: str) -> None:
    """Deterministic kills inside publish (the child process patches itself; the package has no hook).

    With renameat2 the output path holds the new release from the swap on. Without it (the
    fallback), a kill between the two renames leaves nothing at the output path: the one window
    in which a reader sees no release, closed by the next run's `recover_stale`.
    """
    run = tmp_path
    shutil.copytree(rig.run / "out", run / "out")  # some complete release, to be replaced
    before = tree(run / "out")
    manifest = rig_manifest(run, "merge.yaml", rig.inputs, "float32", "out", "8KB", overwrite=True)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, moment, str(manifest)],
        cwd=run,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = sorted(p.name for p in run.iterdir() if p.name.startswith(".out."))
    if moment == "after-exchange":
        assert rig.complete_new(run / "out") is None
        assert [n for n in leftovers if n.endswith(".staging")], leftovers  # the previous release, to be removed
    else:
        assert not (run / "out").exists() and [n for n in leftovers if n.endswith(".old")], leftovers
    with output_lock(run / "out"):  # what the next run does first
        pass
    assert sorted(p.name for p in run.iterdir()) == ["merge.yaml", "out"]
    if moment == "after-exchange":
        assert rig.complete_new(run / "out") is None
    else:
        assert tree(run / "out") == before
    assert rig.input_state() == rig.input_hashes


# --------------------------------------------------------------------------- disk full


def test_disk_full_by_file_size_limit(rig: Rig, tmp_path: Path) -> None:
    """RLIMIT_FSIZE with SIGXFSZ ignored: the first write past the limit fails with EFBIG."""
    manifest = rig_manifest(tmp_path, "merge.yaml", rig.inputs, "float32", "out")  # one 100 KB file

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))

    code, _, err = finish(start(manifest, preexec_fn=limit))
    assert code == 1, err
    line = one_error_line(err)
    assert line.startswith("error: cannot write the release: File too large") and "file-size limit" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]
    assert rig.input_state() == rig.input_hashes
    from mergekit_lite import run_merge

    assert run_merge(manifest, verify=False).is_dir()  # the next run, without the limit, succeeds


@pytest.fixture
def mount_point(tmp_path: Path):
    """A folder under tmp_path that the test may mount over; unmounted afterwards, whatever happens."""
    folder = tmp_path / "mnt"
    folder.mkdir()
    mounted: list[Path] = []

    def mount(*args: str) -> None:
        done = subprocess.run(["mount", *args], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount here ({done.stderr.strip() or done.returncode}); run as root with CAP_SYS_ADMIN")
        mounted.append(folder)

    yield folder, mount
    for _ in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True, check=False)


def test_disk_full_on_a_small_tmpfs(rig: Rig, tmp_path: Path, mount_point) -> None:
    """The free-space check passes (the plan's bytes fit) but the release does not: ENOSPC mid-write."""
    folder, mount = mount_point
    mount("-t", "tmpfs", "-o", "size=112k", "tmpfs", str(folder))
    manifest = rig_manifest(tmp_path, "merge.yaml", rig.inputs, "float32", "mnt/out", "8KB")
    from mergekit_lite.cli import main

    result = CliRunner().invoke(main, ["merge", "-q", str(manifest)])
    assert result.exit_code == 1, result.output
    line = one_error_line(result.stderr)
    assert line.startswith("error: cannot write the release: No space left on device") and "disk is full" in line, line
    assert list(folder.iterdir()) == []
    assert rig.input_state() == rig.input_hashes


def test_disk_too_small_is_refused_before_writing(rig: Rig, tmp_path: Path, mount_point) -> None:
    folder, mount = mount_point
    mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder))
    manifest = rig_manifest(tmp_path, "merge.yaml", rig.inputs, "float32", "mnt/out")
    from mergekit_lite.cli import main

    result = CliRunner().invoke(main, ["merge", "-q", str(manifest)])
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert "needs 98.94 KB but its disk has 65.54 KB free" in line, line
    assert list(folder.iterdir()) == []


# --------------------------------------------------------------------------- read-only output location


def test_read_only_bind_mount(rig: Rig, tmp_path: Path, mount_point) -> None:
    """The output's folder is a read-only bind mount (root ignores chmod, not a read-only mount)."""
    folder, mount = mount_point
    shutil.copytree(rig.run / "out", folder / "out")  # a previous release, which must survive
    before = tree(folder / "out")
    mount("--bind", str(folder), str(folder))
    mount("-o", "remount,ro,bind", str(folder))
    from mergekit_lite.cli import main

    for output in ("mnt/out", "mnt/new/out"):
        manifest = rig_manifest(tmp_path, "merge.yaml", rig.inputs, "float32", output, overwrite=True)
        result = CliRunner().invoke(main, ["merge", "-q", str(manifest)])
        assert result.exit_code == 2, result.output
        line = one_error_line(result.stderr)
        assert f"cannot write in `{folder}` (a read-only file system); choose a writable output location" in line, line
    assert tree(folder / "out") == before and sorted(p.name for p in folder.iterdir()) == ["out"]
    assert rig.input_state() == rig.input_hashes


def _without_dac_override() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so that root
    obeys permission bits after exec (setuid to `nobody` would be the same, but the interpreter may
    live where nobody cannot reach it, as under /root here)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unwritable_folder_without_root_privileges(rig: Rig, tmp_path: Path) -> None:
    """A folder the user may not write in (mode 0555); root runs the merge without CAP_DAC_OVERRIDE."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    manifest = rig_manifest(tmp_path, "merge.yaml", rig.inputs, "float32", "locked/out")
    try:
        proc = start(manifest, preexec_fn=_without_dac_override if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as exc:  # prctl refused: no CAP_SETPCAP in this container
        locked.chmod(0o755)
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here ({exc})")
    try:
        code, _, err = finish(proc)
    finally:
        locked.chmod(0o755)
    assert code == 2, err
    line = one_error_line(err)
    assert f"cannot write in `{locked}` (not writable by this user)" in line, line
    assert list(locked.iterdir()) == []
    assert rig.input_state() == rig.input_hashes


# --------------------------------------------------------------------------- two runs, Ctrl-C


def test_two_runs_on_one_output(rig: Rig, tmp_path: Path) -> None:
    """The first run takes the lock and is frozen mid-run (SIGSTOP); the second fails fast naming it;
    the first, resumed, publishes a complete release."""
    manifest = rig_manifest(tmp_path, "merge.yaml", rig.inputs, "float32", "out", "8KB")
    output = (tmp_path / "out").resolve()
    first = start(manifest)
    try:
        while staging_of(tmp_path) is None:
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.001)
        first.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        code, _, err = finish(start(manifest), timeout=120)
        waited = time.monotonic() - began
        assert code == 75, err
        expected = f"error: output `{output}` is being written by another run (pid {first.pid}); wait for it"
        assert one_error_line(err) == expected
        assert waited < rig.duration + 30, "the second run should not wait for the lock"
        stagings = [p.name for p in tmp_path.iterdir() if p.name.endswith(".staging")]
        assert len(stagings) == 1, f"the second run made a staging folder too: {stagings}"
    finally:
        first.send_signal(signal.SIGCONT)
    code, _, err = finish(first)
    assert code == 0, err
    assert rig.complete_new(tmp_path / "out") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml", "out"]


INTERRUPTS = {
    "SIGINT": (signal.SIGINT, 130, "error: interrupted; nothing was published"),
    "SIGTERM": (signal.SIGTERM, 143, "error: terminated (SIGTERM); nothing was published"),  # a CI job cancelled
}


@pytest.mark.parametrize("moment", ["shard", "gate"])
@pytest.mark.parametrize("name", sorted(INTERRUPTS))
def test_interrupted(rig: Rig, tmp_path: Path, moment: str, name: str) -> None:
    """SIGINT (Ctrl-C) or SIGTERM while merging or while the gate runs: exit 130 / 143, one line,
    staging and lock removed, the previous release untouched."""
    signum, exit_code, line = INTERRUPTS[name]
    shutil.copytree(rig.run / "out", tmp_path / "out")
    before = tree(tmp_path / "out")
    manifest = rig_manifest(tmp_path, "merge.yaml", rig.inputs, "float32", "out", "8KB", overwrite=True)
    proc = start(manifest)
    target = "model-00001-of-00013.safetensors" if moment == "shard" else "config.json"
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        stage = staging_of(tmp_path)
        if stage is not None and (stage / target).exists():
            break
        time.sleep(0.0005)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == sorted([".out.lock", stage.name])
    proc.send_signal(signum)
    code, _, err = finish(proc)
    assert code == exit_code, err
    assert one_error_line(err) == line
    assert tree(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml", "out"]
    assert rig.input_state() == rig.input_hashes


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_publish_is_deferred(signum: int) -> None:
    """SIGINT or SIGTERM arriving while the release is renamed into place is held until the swap is
    done (then the run exits 130 / 143, saying the release is complete); the handlers are restored."""
    from mergekit_lite import pipeline

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pipeline._interrupts_deferred() as seen:
        os.kill(os.getpid(), signum)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
    assert seen == [signum]
    assert {s: signal.getsignal(s) for s in before} == before
