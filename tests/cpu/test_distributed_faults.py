"""A job of several processes never waits in silence (issue #29 part 2): set-up problems and
faults end every rank with exit status 2 and one line naming the variable, flag, port or rank,
within a bound the user sets (``--rendezvous-timeout``, ``--timeout``); a torchrun restart
resumes from the last checkpoint.

In-process cases (the launcher's environment, flags that need or exclude a launcher, sentence
counts against WORLD_SIZE) run ``lineas_fast.cli.main`` here with the environment set by
monkeypatch. Their model folder holds a broken weights file: a check that ran only after loading
the model would fail on the weights instead, so each case also shows the model was not loaded.

Multi-process cases start real processes (gloo on the CPU, no mock of torch.distributed): ranks
started by hand with the launcher's variables (a missing peer, a MASTER_PORT held by another
program, ranks holding other weights, a stopped rank), and a torchrun job with --max-restarts.
Each process runs in its own session under a deadline (``DEADLINE``), and its whole process group
is killed at teardown. Time bounds are generous upper bounds that prove "does not hang" (a
process start here takes 5-15 s of imports), never measurements.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.cli import main
from lineas_fast.training.launch import LaunchError, read_launch

MODULES = NORMS["llama"]
DEADLINE = 240  # seconds any process started here may run before it is killed (a hang fails)
BOUND = 120  # seconds within which a refusal must come (rendezvous bound 4 s + process start)
MAP_ATOL = 1e-5  # SGD over 2 ranks against one process (tests/cpu/test_distributed.py)
FULL = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
OUTER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama folder, one with other weights, one whose weights file is broken, and
    sentence files (full, and of one sentence)."""
    root = tmp_path_factory.mktemp("faults")
    for name, seed in (("model", 0), ("other", 1), ("broken", 0)):
        tiny_model("llama", seed=seed).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    (root / "broken" / "model.safetensors").write_bytes(b"not a weight file")
    (root / "src.txt").write_text("\n".join(SOURCE) + "\n")
    (root / "tgt.txt").write_text("\n".join(TARGET) + "\n")
    (root / "one.txt").write_text(SOURCE[0] + "\n")
    return root


def flags(files: Path, out: Path, steps: int = 2, **override) -> list[str]:
    """``train`` arguments; ``override``: {flag name without dashes: value, True for a flag
    without a value, None to drop the flag}."""
    given = {
        "model": files / "model", "source": files / "src.txt", "target": files / "tgt.txt",
        "modules": MODULES, "steps": steps, "batch-size": 5, "optimizer": "sgd", "lr": 0.1, "seed": 3,
        "out": out,
    }  # fmt: skip
    given.update(override)
    argv = ["train"]
    for k, v in given.items():
        if v is not None:
            argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OUTER and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Jobs:
    """Processes started by a test, each in its own session; every one still running at teardown
    is killed with its whole process group."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, env, log: Path, cwd=None) -> subprocess.Popen:
        with open(log, "w") as sink:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=sink, stderr=sink, start_new_session=True)
        proc.started, proc.log = time.monotonic(), log
        self.procs.append(proc)
        return proc

    def finish(self, proc, timeout: float = DEADLINE) -> float:
        """Wait for ``proc`` (killed at the deadline: the test then fails); seconds it ran."""
        try:
            proc.wait(timeout=max(1.0, proc.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill(proc)
            raise AssertionError(
                f"still running after {timeout} s:\n{proc.log.read_text()[-3000:]}"
            ) from None
        return time.monotonic() - proc.started

    def close(self):
        for proc in self.procs:
            kill(proc)


def kill(proc) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the process and everything it started
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def jobs():
    j = Jobs()
    yield j
    j.close()


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "lineas_fast.cli", *map(str, argv)]


def error_line(text: str) -> str:
    """The command's one error line (torch may log before it)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("lineas-fast train: ")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


# --- in process: the environment and the flags, before any model ----------------------------
PARTIAL = "is set but"
IN_PROCESS = [
    # (case, environment, flag overrides, what the one line says)
    ("rank alone", {"RANK": "1"}, {}, "RANK='1' is set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not"),
    ("world alone", {"WORLD_SIZE": "2"}, {}, "WORLD_SIZE='2' is set but RANK, MASTER_ADDR, MASTER_PORT"),
    (
        "address without ranks",
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
        {},
        "MASTER_ADDR='127.0.0.1', MASTER_PORT='29500' are set but RANK, WORLD_SIZE are not",
    ),
    ("no port", {**FULL, "MASTER_PORT": None}, {}, "are set but MASTER_PORT is not"),
    ("WORLD_SIZE=two", {**FULL, "WORLD_SIZE": "two"}, {}, "WORLD_SIZE='two' is not a whole number"),
    ("WORLD_SIZE=0", {**FULL, "WORLD_SIZE": "0"}, {}, "WORLD_SIZE=0 must be >= 1"),
    ("RANK >= WORLD_SIZE", {**FULL, "RANK": "2"}, {}, "RANK=2 is not a rank of WORLD_SIZE=2 processes"),
    ("RANK < 0", {**FULL, "RANK": "-1"}, {}, "RANK=-1 must be >= 0"),
    ("port out of range", {**FULL, "MASTER_PORT": "70000"}, {}, "MASTER_PORT=70000 is not a TCP port"),
    ("port not a number", {**FULL, "MASTER_PORT": "http"}, {}, "MASTER_PORT='http' is not a whole number"),
    ("empty address", {**FULL, "MASTER_ADDR": " "}, {}, "MASTER_ADDR is empty"),
    ("LOCAL_RANK", {**FULL, "LOCAL_RANK": "x"}, {}, "LOCAL_RANK='x' is not a whole number"),
    (
        "--fsdp without a launcher",
        {},
        {"fsdp": True},
        "--fsdp shards the model over the processes of a torchrun",
    ),
    (
        "--pipeline under a launcher",
        FULL,
        {"model": None, "pipeline": "PIPE"},
        "--pipeline 'PIPE': diffusers pipelines train in one process, and this is rank 0 of WORLD_SIZE=2",
    ),
    ("1 source sentence", FULL, {"source": "ONE"}, "--source: 1 source sentence for WORLD_SIZE=2 processes"),
    ("1 target sentence", FULL, {"target": "ONE"}, "--target: 1 target sentence for WORLD_SIZE=2 processes"),
    (
        "--batch-size below WORLD_SIZE",
        {**FULL, "WORLD_SIZE": "3"},
        {"batch-size": 2},
        "--batch-size 2 is smaller than WORLD_SIZE=3",
    ),
]


@pytest.mark.parametrize("case, env, override, expected", IN_PROCESS, ids=[c[0] for c in IN_PROCESS])
def test_setup_problem_is_refused_before_the_model_naming_it(
    files, tmp_path, monkeypatch, capsys, case, env, override, expected
):
    for k in OUTER:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        if v is not None:
            monkeypatch.setenv(k, v)
    given = {"model": files / "broken", "rendezvous-timeout": 2}  # the net: never wait long here
    given.update({k: {"ONE": files / "one.txt"}.get(v, v) for k, v in override.items()})
    assert main(flags(files, tmp_path / "out.safetensors", **given)) == 2
    err = capsys.readouterr().err
    assert err.strip() == error_line(err) and error_line(err).startswith("lineas-fast train: error: ")
    assert expected in err, err
    assert "cannot load" not in err  # the broken weights were never read
    assert not (tmp_path / "out.safetensors").exists()


def test_library_refuses_a_partial_environment_naming_the_variable(monkeypatch):
    for k in OUTER:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(LaunchError, match="RANK='1' is set but WORLD_SIZE") as caught:
        lf.train(tiny_model("llama"), tiny_tokenizer(), SOURCE, TARGET, MODULES, steps=1, progress=False)
    assert caught.value.argument == "WORLD_SIZE"
    with pytest.raises(LaunchError, match="RANK='1'"):
        lf.training.distributed.is_main()  # it no longer guesses "not rank 0" and skips the write
    assert read_launch({}) is None
    launch = read_launch({**FULL, "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert (launch.rank, launch.world_size, launch.restart, launch.agent_store) == (0, 2, 2, True)


# --- several processes: set-up faults --------------------------------------------------------
@pytest.fixture(scope="module")
def setup_faults(files, jobs, tmp_path_factory):
    """Every set-up fault's ranks, started at once; {case: [(status, seconds, log text) per rank]}."""
    out = tmp_path_factory.mktemp("setup")
    held = socket.socket()  # another program holding MASTER_PORT: it accepts and never answers
    held.bind(("127.0.0.1", 0))
    held.listen(8)
    busy = held.getsockname()[1]
    cases = {
        # rank 0 alone, its peer never started; rank 1 alone, no rank 0 serving the store
        "missing rank 1": [(0, free_port(), {})],
        "missing rank 0": [(1, free_port(), {})],
        "busy port": [(0, busy, {}), (1, busy, {})],
        # both ranks arrive (a long bound: they start together); rank 1 loaded other weights
        "other weights": [(0, p := free_port(), {}), (1, p, {"model": files / "other"})],
    }
    started = {}
    for case, ranks in cases.items():
        for rank, port, override in ranks:
            env = clean_env(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            tag = f"{case.replace(' ', '-')}-{rank}"
            bound = 90 if case == "other weights" else 4
            argv = cli(*flags(files, out / f"{tag}.safetensors", **{"rendezvous-timeout": bound, **override}))
            started.setdefault(case, []).append(jobs.start(argv, env, out / f"{tag}.log"))
    try:
        results = {}
        for case, procs in started.items():
            seconds = [jobs.finish(p) for p in procs]
            results[case] = [(p.returncode, t, p.log.read_text()) for p, t in zip(procs, seconds)]
        return results
    finally:
        held.close()


STORE = "the job's store at MASTER_ADDR:MASTER_PORT=127.0.0.1:"
WITHIN = "within the rendezvous timeout of 4 s (rendezvous_timeout / --rendezvous-timeout)"
SETUP_FAULTS = [
    # (case, per rank: the parts its one error line holds)
    (
        "missing rank 1",
        [("rank 0: only 1 of WORLD_SIZE=2 processes reached " + STORE, WITHIN, "rank(s) 1 did not")],
    ),
    ("missing rank 0", [("rank 1 could not connect to " + STORE, WITHIN, "nothing listens there")]),
    (
        "busy port",
        [
            (
                "is in use on this host: rank 0 cannot serve the job's store there",
                "give every rank a free MASTER_PORT",
            ),
            ("rank 1 could not connect to " + STORE, WITHIN, "another program holds that port"),
        ],
    ),
    ("other weights", [("ranks [1] hold other weights than rank 0",)] * 2),
]


@pytest.mark.parametrize("case, expected", SETUP_FAULTS, ids=[c[0] for c in SETUP_FAULTS])
def test_setup_fault_ends_every_rank_with_status_2_naming_it(setup_faults, case, expected):
    for rank, ((status, seconds, log), parts) in enumerate(zip(setup_faults[case], expected)):
        line = error_line(log)
        for part in parts:
            assert part in line, line
        assert status == 2, log[-3000:]
        assert seconds < BOUND, f"rank {rank}: {seconds:.0f} s"


# --- several processes: a stopped rank -------------------------------------------------------
def test_a_stopped_rank_is_named_by_the_others_within_the_timeout(files, jobs, tmp_path):
    """Three ranks; rank 1 is stopped (SIGSTOP) after the first checkpoint: ranks 0 and 2 each
    fail within --timeout 15 s (plus the 5 s they wait for the others' reports and heartbeats),
    naming rank 1, with its pid, as stopped or gone. (15 s, not less: before the stop, the first
    collective waits for the slowest rank's model load on this loaded machine.)"""
    port, ck = free_port(), tmp_path / "ck.pt"
    argv = flags(files, tmp_path / "out.safetensors", steps=100000, checkpoint=ck, **{"checkpoint-every": 2})
    procs = [
        jobs.start(
            cli(*argv, "--timeout", "15"),
            clean_env(RANK=str(r), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
            tmp_path / f"rank{r}.log",
        )
        for r in range(3)
    ]
    deadline = time.monotonic() + DEADLINE
    while not ck.exists() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ck.exists(), procs[0].log.read_text()[-3000:]
    os.kill(procs[1].pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        for r in (0, 2):
            jobs.finish(procs[r])
            waited = time.monotonic() - stopped
            line = error_line(procs[r].log.read_text())
            assert procs[r].returncode == 2, line
            assert f"collective failed on rank {r} of 3" in line
            assert "within the collective timeout of 15 s (timeout / --timeout)" in line
            stopped_rank = f"rank 1 ({socket.gethostname()} pid {procs[1].pid})"
            assert f"{stopped_rank} is stopped or gone (no heartbeat)" in line, line
            assert waited < BOUND, f"{waited:.0f} s"
    finally:
        kill(procs[1])
    assert not (tmp_path / "out.safetensors").exists()


# --- torchrun: a rank killed mid-run, the group restarted, the run resumed --------------------
def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)


def test_torchrun_restart_resumes_from_the_last_checkpoint_to_the_uninterrupted_maps(files, jobs, tmp_path):
    steps, ck = 80, tmp_path / "ck.pt"
    argv = flags(files, tmp_path / "two.safetensors", steps=steps, checkpoint=ck, **{"checkpoint-every": 5})
    run = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--max-restarts=1", "-m", "lineas_fast.cli", *argv,
    ]  # fmt: skip
    job = jobs.start(run, clean_env(), tmp_path / "job.log")
    deadline = time.monotonic() + DEADLINE
    while not ck.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victims = [p for p in children(job.pid) if rank_of(p) == "1"]
    assert ck.exists() and victims, job.log.read_text()[-3000:]
    os.kill(victims[0], signal.SIGKILL)
    killed_at = torch.load(ck, weights_only=False)["step"]
    jobs.finish(job)
    log = job.log.read_text()
    assert job.returncode == 0, log[-4000:]
    assert killed_at < steps
    assert "restart 1: resuming from" in log  # rank 0 of the restarted group
    assert log.count("wrote ") == 1
    # the uninterrupted run, in one process (SGD: the 2-rank maps equal it to float rounding)
    one = tmp_path / "one.safetensors"
    assert main(flags(files, one, steps=steps)) == 0
    a, b = lf.Steering.load(str(one)), lf.Steering.load(str(tmp_path / "two.safetensors"))
    assert len(b.metadata["history"]) == steps and b.metadata["world_size"] == 2
    assert [r["loss"] for r in b.metadata["history"][:killed_at]] == pytest.approx(
        [r["loss"] for r in a.metadata["history"][:killed_at]], abs=1e-5
    )
    for m in a.modules:
        for x, y in zip(a[m], b[m]):
            assert float((x - y).abs().max()) <= MAP_ATOL


# --- leaving: a process whose group was never finished exits cleanly ------------------------
LEAVER = """
import os, sys, torch, torch.distributed as dist
from lineas_fast.training import rendezvous
rendezvous.BEAT = 1e-5  # the heartbeat almost always inside a store call, as under heavy load
from lineas_fast.training.distributed import setup
setup(timeout=60, rendezvous_timeout=60)
t = torch.ones(3)
dist.all_reduce(t)
dist.destroy_process_group()  # as a user script leaves it: no distributed.finish()
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}"), "w") as out:
    out.write(str(int(t[0])))
"""


def test_a_rank_leaving_without_finish_exits_cleanly(jobs, tmp_path):
    """The heartbeat thread is stopped and joined at interpreter exit: a daemon thread still
    inside the store's C++ call at finalization aborted the process after its work was done
    ("terminate called without an active exception", exit -6; CI, and 3 of 8 runs of this
    script before the fix). Two launches of three ranks: six exits."""
    script = tmp_path / "leaver.py"
    script.write_text(LEAVER)
    for launch in range(2):
        sums = tmp_path / f"sums{launch}"
        sums.mkdir()
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
        run += [str(script), str(sums)]
        job = jobs.start(run, clean_env(), tmp_path / f"launch{launch}.log")
        jobs.finish(job)
        log = job.log.read_text()
        assert "terminate called" not in log, log[-3000:]
        assert job.returncode == 0, log[-3000:]
        assert [(sums / f"rank{r}").read_text() for r in range(3)] == ["3"] * 3
