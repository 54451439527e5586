"""Atomic writes under kills: ``lineas-fast fuse --overwrite`` and ``Steering.save`` always leave
the old or the new complete output at the destination, and no temporary once the next write ran.

The fuse process is SIGKILLed at random moments of a write loop and at exact stages of the
overwrite (``LINEAS_FAST_TEST_PAUSE_AT``, see lineas_fast/atomic.py), with the atomic exchange and
with the two-rename fallback; SIGTERM and Ctrl-C are cleaned up by the process itself."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast import atomic as io
from lineas_fast.cli import main

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLD = r"model\.layers\.\d+\.(input|post_attention)_layernorm"
# the fuse CLI; NO_EXCHANGE forces the two-rename swap (filesystems without renameat2 exchange)
CLI = (
    "import os, sys, lineas_fast.atomic as io\n"
    "if os.environ.get('NO_EXCHANGE'): io._exchange = lambda a, b: False\n"
    "from lineas_fast.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
PAIR = """
import torch, lineas_fast as lf
def pair():
    g = torch.Generator().manual_seed(0)
    return [lf.Steering({f"m{i}": (1 + torch.randn(8192, generator=g), torch.randn(8192, generator=g))
                         for i in range(8)}) for _ in range(2)]
"""
# Many kills cheaply: one driver process imports everything once (one thread, so forking is
# safe), then per job forks a child, signals it and reports which complete model ``out`` holds.
# Stage jobs run the CLI's ``main(["fuse", ..., "--overwrite"])`` once, stopped at
# LINEAS_FAST_TEST_PAUSE_AT; random jobs overwrite ``out`` with the fused models a, b, a, ... by
# the CLI's ``write_checkpoint`` in a loop (so nearly every random moment is inside a write).
FUSE_KILLER = """
import json, os, random, select, signal, sys, time
import argparse, torch, tqdm
torch.set_num_threads(1)
tqdm.tqdm.monitor_interval = 0          # no tqdm monitor thread: this process forks
# tqdm's default write lock includes a multiprocessing lock that forked children share: a child
# SIGKILLed inside a progress bar would hold it forever and the next bar here would hang
tqdm.std.TqdmDefaultWriteLock.mp_lock = None
import lineas_fast as lf, lineas_fast.atomic as io
from lineas_fast.cli import main
from lineas_fast.cli.common import load_model_or_pipeline
from lineas_fast.cli.fuse import write_checkpoint
from transformers import AutoModelForCausalLM
model, a, b, ref_a, ref_b, jobs = sys.argv[1:]
exchange = io._exchange
def weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()
refs = {"a": weights(ref_a), "b": weights(ref_b)}
steerings = [lf.Steering.load(a), lf.Steering.load(b)]
fused = [load_model_or_pipeline(argparse.Namespace(model=model, pipeline=None)) for _ in "ab"]
fused = [(lf.fuse(m, s), tok) for (m, tok), s in zip(fused, steerings)]
def holds(out):
    got = weights(out) if os.path.isdir(out) and os.listdir(out) else {}
    return [k for k, ref in refs.items()
            if got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)]
rng = random.Random(5)
for job in json.loads(jobs):
    out, stage = job["out"], job["stage"]
    io._exchange = (lambda x, y: False) if job["fallback"] else exchange
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(w if stage else null, 2)
        if stage:
            os.environ["LINEAS_FAST_TEST_PAUSE_AT"] = stage
            os._exit(main(["fuse", "--model", model, "--steering", b, "--out", out,
                           "--overwrite"]))
        for i in range(10**6):
            write_checkpoint(*fused[i % 2], out, steerings[i % 2], 1.0, (a, b)[i % 2])
    os.close(w)
    report = {}
    if stage:
        seen, end = b"", time.time() + 60
        while ("paused at " + stage).encode() not in seen:
            if not select.select([r], [], [], max(0.0, end - time.time()))[0]:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            seen += chunk
        report["paused"] = ("paused at " + stage).encode() in seen
        report["while_paused"] = holds(out)
    else:
        time.sleep(rng.uniform(0.05, 0.5))
    os.kill(pid, getattr(signal, job["signal"]))
    _, status = os.waitpid(pid, 0)
    os.close(r)
    report["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    report["leftovers"] = sorted(e[:12] for e in os.listdir(os.path.dirname(out))
                                 if e.startswith(".lineas-"))
    report["holds"] = holds(out)
    print(json.dumps(report), flush=True)
"""
SAVE_KILLER = (
    PAIR
    + """
import json, os, random, signal, sys, time
torch.set_num_threads(1)
path, rounds = sys.argv[1], int(sys.argv[2])
a, b = pair()
a.save(path)
rng = random.Random(7)
for r in range(rounds):
    pid = os.fork()
    if pid == 0:
        for i in range(10**7):
            (a, b)[i % 2].save(path)
    time.sleep(rng.uniform(0.02, 0.3))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    got = lf.Steering.load(path)
    held = [k for k, s in (("a", a), ("b", b)) if all(
        torch.equal(got[n][0], s[n][0]) and torch.equal(got[n][1], s[n][1]) for n in s.modules)]
    left = [e for e in os.listdir(os.path.dirname(path)) if e.startswith(".lineas-")]
    (a, b)[r % 2].save(path)
    after = [e for e in os.listdir(os.path.dirname(path)) if e.startswith(".lineas-")]
    print(json.dumps({"holds": held, "leftovers": left, "after_next_save": after}), flush=True)
"""
)


def leftovers(folder):
    return sorted(e for e in os.listdir(folder) if e.startswith(".lineas-"))


def steering_for(model, seed):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    names = [n for n, _ in model.named_modules() if re.fullmatch(FOLD, n)]
    return lf.Steering(
        {n: (1 + 0.3 * torch.randn(d, generator=g), 0.3 * torch.randn(d, generator=g)) for n in names},
        {"model": lf.model_fingerprint(model)},
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny model, two steerings and the two complete fused folders they give."""
    root = tmp_path_factory.mktemp("atomic")
    model_dir = root / "model"
    model = tiny_model("llama")
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    w = {"root": root, "model": str(model_dir)}
    for key, seed in (("a", 1), ("b", 2)):
        w[key] = str(root / f"{key}.safetensors")
        steering_for(model, seed).save(w[key])
        ref = root / f"fused_{key}"
        assert main(["fuse", "--model", w["model"], "--steering", w[key], "--out", str(ref)]) == 0
        w[f"fused_{key}"] = ref
        w[f"weights_{key}"] = load_weights(ref)
    assert any(not torch.equal(w["weights_a"][k], w["weights_b"][k]) for k in w["weights_a"])
    return w


def load_weights(folder):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def which_model(world, folder) -> str:
    """'a' or 'b': the complete fused model found at ``folder`` (any other state fails)."""
    assert os.path.isdir(folder), f"{folder} is missing"
    names = set(os.listdir(folder))
    assert names == set(os.listdir(world["fused_a"])), names
    got = load_weights(folder)
    for key in ("a", "b"):
        ref = world[f"weights_{key}"]
        if got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref):
            return key
    raise AssertionError(f"{folder} holds neither the old nor the new model")


def fresh_out(world, name, key="a"):
    """A folder of its own holding the complete fused model ``key`` at ``<folder>/out``."""
    folder = world["root"] / name
    folder.mkdir()
    shutil.copytree(world[f"fused_{key}"], folder / "out")
    return folder, folder / "out"


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_stray_processes():
    """Whatever a test leaves running (a failed wait, a hung driver and its forked children) is
    killed with its whole process group, so no sleeper outlives the test."""
    yield
    while _started:
        proc = _started.pop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def start(args, env=None):
    """A child python in a process group of its own (one thread each: several run at once on
    few cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    _started.append(proc)
    return proc


def wait_for_line(stream, text, timeout=90.0):
    """Read ``stream`` until a line contains ``text`` (a reader thread, so a hang fails)."""
    found = threading.Event()
    seen = []

    def read():
        for line in stream:
            seen.append(line)
            if text in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"no {text!r} within {timeout}s; got {''.join(seen)[-2000:]}"


def fuse_args(world, out, key="b"):
    return ["fuse", "--model", world["model"], "--steering", world[key], "--out", str(out), "--overwrite"]


# real CLI processes: (stage, two-rename fallback, what `out` holds while stopped there)
CLI_STAGES = [("swapped", False, "b"), ("moved-aside", True, None)]
# forked jobs: (stage or None for a random moment, fallback, signal)
JOBS = (
    [(None, False, "SIGKILL")] * 3
    + [(None, True, "SIGKILL")] * 3
    + [("written", False, "SIGKILL"), ("swapped", True, "SIGKILL"), ("swapped", True, "SIGTERM")]
)


def test_fuse_overwrite_survives_kills(world):
    """``fuse --overwrite`` over a complete model ``a`` (writing ``b``), SIGKILLed at random
    moments and at each stage of the swap (LINEAS_FAST_TEST_PAUSE_AT), with the atomic exchange
    and the two-rename fallback: ``out`` always holds the old or the new complete model (the
    fallback stopped between its two renames: ``out`` absent until ``recover`` or the next write
    puts the old one back), and the next write leaves no temporary. SIGTERM: the process
    removes its own temporaries and dies by the signal."""
    cli = []
    for i, (stage, fallback, _) in enumerate(CLI_STAGES):
        folder, out = fresh_out(world, f"cli{i}")
        args = (
            ["-c", CLI, *fuse_args(world, out)]
            if fallback
            else ["-m", "lineas_fast.cli", *fuse_args(world, out)]
        )  # lineas-fast fuse
        env = {"LINEAS_FAST_TEST_PAUSE_AT": stage, "NO_EXCHANGE": "1" if fallback else ""}
        cli.append((folder, out, start(args, env)))
    jobs = []
    for i, (stage, fallback, sig) in enumerate(JOBS):
        folder, out = fresh_out(world, f"job{i}")
        jobs.append({"out": str(out), "stage": stage, "fallback": fallback, "signal": sig})
    driver = start(
        [
            "-c",
            FUSE_KILLER,
            world["model"],
            world["a"],
            world["b"],
            world["fused_a"],
            world["fused_b"],
            json.dumps(jobs),
        ]
    )

    for (stage, fallback, holds), (folder, out, proc) in zip(CLI_STAGES, cli):
        wait_for_line(proc.stderr, f"paused at {stage}")
        if holds is None:  # the one window the fallback has: old folder set aside
            assert not out.exists()
            assert [e[:12] for e in leftovers(folder)] == [".lineas-old-", ".lineas-tmp-"]
        else:
            assert which_model(world, out) == holds
        proc.kill()
        proc.wait(30)
        assert leftovers(folder), stage  # SIGKILL cannot clean
        if holds is None:
            io.recover(out)
            assert which_model(world, out) == "a" and leftovers(folder) == []
        else:  # the next write cleans up, then writes
            assert main(fuse_args(world, out, "a")) == 0
            assert leftovers(folder) == [] and which_model(world, out) == "a"

    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr[-3000:]
    reports = [json.loads(line) for line in stdout.splitlines()]
    assert len(reports) == len(jobs), stdout
    expect_paused = {"written": ["a"], "swapped": ["b"]}
    assert any(rep["leftovers"] for job, rep in zip(jobs, reports) if not job["stage"]), (
        "no random kill landed inside a write"
    )
    for job, rep in zip(jobs, reports):
        out, folder = job["out"], os.path.dirname(job["out"])
        assert rep["signal"] == getattr(signal, job["signal"]), (job, rep)
        if job["stage"]:
            assert rep["paused"] and rep["while_paused"] == expect_paused[job["stage"]], (job, rep)
        if job["signal"] == "SIGTERM":
            assert rep["leftovers"] == [] and rep["holds"] == ["b"], (job, rep)
            continue
        if not rep["holds"]:  # killed between the fallback's two renames
            assert job["fallback"] and ".lineas-old-" in rep["leftovers"], (job, rep)
            io.recover(out)
        else:
            assert len(rep["holds"]) == 1, (job, rep)
        assert which_model(world, out) in ("a", "b")
        assert main(fuse_args(world, out)) == 0
        assert leftovers(folder) == [] and which_model(world, out) == "b"


def test_steering_save_killed_at_random_points(tmp_path):
    """A child saving two steerings alternately over one file is SIGKILLed at random moments:
    the file always loads as one of them; the next save removes the killed one's temporary."""
    path = tmp_path / "s.safetensors"
    proc = start(["-c", SAVE_KILLER, path, 6])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    rounds = [json.loads(line) for line in stdout.splitlines()]
    assert len(rounds) == 6, rounds
    for r in rounds:
        assert len(r["holds"]) == 1 and r["after_next_save"] == [], r


def test_sigint_during_a_swap_waits_for_its_end(ctrl_c_raises, tmp_path, monkeypatch):
    """Ctrl-C between the fallback swap's two renames is held until the swap is complete: the
    new folder is in place, the old one and the temporaries are gone, then KeyboardInterrupt."""
    folder = tmp_path / "out"
    with io.atomic_dir(folder) as tmp:
        open(os.path.join(tmp, "x"), "w").write("old")
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    monkeypatch.setattr(
        io, "_pause", lambda stage: stage == "moved-aside" and signal.raise_signal(signal.SIGINT)
    )
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_dir(folder) as tmp:
            open(os.path.join(tmp, "y"), "w").write("new")
    assert os.listdir(folder) == ["y"] and leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):  # a real Ctrl-C while writing
        with io.atomic_path(tmp_path / "r.json") as tmp:
            open(tmp, "w").write("{")
            signal.raise_signal(signal.SIGINT)
    assert leftovers(tmp_path) == [] and not (tmp_path / "r.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_failed_write_keeps_the_old_output(tmp_path):
    path = tmp_path / "r.json"
    with io.atomic_path(path) as tmp:
        open(tmp, "w").write("old")
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_path(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and leftovers(tmp_path) == []
    folder = tmp_path / "out"
    with io.atomic_dir(folder) as tmp:
        open(os.path.join(tmp, "x"), "w").write("old")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_dir(folder) as tmp:
            open(os.path.join(tmp, "x"), "w").write("half")
            raise KeyboardInterrupt
    assert (folder / "x").read_text() == "old" and leftovers(tmp_path) == []
    with io.atomic_dir(folder) as tmp:
        open(os.path.join(tmp, "y"), "w").write("new")
    assert os.listdir(folder) == ["y"] and leftovers(tmp_path) == []


def test_bad_destinations_fail_before_writing(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(IsADirectoryError, match="folder"):
        with io.atomic_path(tmp_path / "d"):
            pytest.fail("the block must not run")
    with pytest.raises(NotADirectoryError, match="file"):
        with io.atomic_dir(tmp_path / "f"):
            pytest.fail("the block must not run")
    with pytest.raises(NotADirectoryError, match="is a file"):
        with io.atomic_path(tmp_path / "f" / "x.json"):
            pytest.fail("the block must not run")
    st = lf.Steering({"m": (torch.ones(3), torch.zeros(3))})
    with pytest.raises(IsADirectoryError):
        st.save(str(tmp_path / "d"))
    st["m"][1][0] = float("nan")  # maps changed in place after construction
    with pytest.raises(ValueError, match="not finite"):
        st.save(str(tmp_path / "s.safetensors"))
    assert not (tmp_path / "s.safetensors").exists() and leftovers(tmp_path) == []


def test_stale_temporaries_only_of_gone_writers_are_removed(tmp_path, monkeypatch):
    """A temporary is removed only when its writer on this host is gone and a lineas_fast
    writer recorded making it: a live writer's (here a running process's pid), our own, another
    host's and planted entries (right name pattern, no record) are kept."""
    monkeypatch.setenv("LINEAS_FAST_CACHE", str(tmp_path / "cache"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:

        def temp(pid, host=io._HOST, name="other.json", registered=True, kind="tmp"):
            path = tmp_path / f".lineas-{kind}-{host}-{pid}-0123abcd-{name}"
            path.write_text("x")
            if registered:  # as a lineas_fast writer records what it makes
                io._register(str(path))
            return path.name

        live, own, foreign = temp(sleeper.pid), temp(os.getpid()), temp(dead.pid, host="ffffff")
        gone = temp(dead.pid)
        # planted by someone else: the name pattern of a dead writer, but no record of ours
        planted = temp(dead.pid, name="planted.json", registered=False)
        planted_old = temp(dead.pid, name="r.json", registered=False, kind="old")
        gone_dir = tmp_path / f".lineas-tmp-{io._HOST}-{dead.pid}-0123abcd-out"
        gone_dir.mkdir()
        (gone_dir / "model.safetensors").write_text("x")
        io._register(str(gone_dir))
        with io.atomic_path(tmp_path / "r.json") as tmp:
            open(tmp, "w").write("{}")
        assert leftovers(tmp_path) == sorted([live, own, foreign, planted, planted_old])
        assert gone not in leftovers(tmp_path)
        assert (tmp_path / "r.json").read_text() == "{}"  # the planted backup was not moved onto it
    finally:
        sleeper.kill()
        sleeper.wait()
