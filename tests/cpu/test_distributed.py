"""Training over several processes (torch.distributed, gloo on the CPU), started by torchrun.

Each launch runs tests/distributed_worker.py on every rank; the single-process references are
computed here, in the test process, with the same settings. Tolerances: the maps of an N-rank
run (data parallel, and FSDP2 + data parallel) equal the single-process maps within 1e-5
absolute (measured: ≤ 2.4e-7; the only difference is the order of float sums, in the forwards
of other batch compositions and in the gradient summed over ranks); the gradient through the
gather within 1e-6 absolute (measured 4e-9, on gradients of ~1e-2); the ranks hold bitwise
equal maps; the loss read over the ranks equals the single-process loss exactly. Per optimizer,
the same 60-step run (``worker.ADAM`` / ``worker.SGD``, 2 ranks) measured 1.2e-7 absolute from one
process with either (maps moved by up to 0.62 with Adam, 0.41 with SGD); Adam's bound below is
10x MAP_ATOL, not the SGD bound, because Adam divides each coordinate's step by its gradient's RMS,
which turns a rounding difference on a coordinate whose gradient is ~0 into a difference of up to
lr per step (docs/distributed.md).

Every subprocess runs under a timeout; nothing asserts on time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.training.distributed import DistributedError, setup

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
import distributed_worker as worker  # noqa: E402

LAUNCH_TIMEOUT = 240  # seconds for one torchrun job (the worker's collectives time out at 60)
MAP_ATOL = 1e-5
ADAM_ATOL = 1e-4
GRAD_ATOL = 1e-6


def torchrun(report: Path, nproc: int, *scenarios: str, timeout: float = LAUNCH_TIMEOUT, check=True):
    env = {k: v for k, v in os.environ.items() if k not in worker_env_keys()}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(TESTS / "distributed_worker.py"), str(report), *scenarios,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def worker_env_keys():
    """The launch variables of an outer torchrun (never inherited by the jobs started here)."""
    return ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def report_of(report: Path, scenario: str, nproc: int) -> list[dict]:
    return [torch.load(report / f"{scenario}-rank{r}.pt", weights_only=False) for r in range(nproc)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((x - y).abs().max()) for m in a for x, y in zip(a[m], b[m]))


def assert_same_on_every_rank(outs: list[dict], key: str = "maps") -> None:
    for r, out in enumerate(outs[1:], 1):
        for m in outs[0][key]:
            for x, y in zip(out[key][m], outs[0][key][m]):
                assert torch.equal(x, y), f"rank {r} holds other {key} than rank 0 at {m}"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def single(tok):
    """Single-process references (no process group here)."""
    train = lambda **kw: worker.maps_of(  # noqa: E731
        lf.train(tiny_model("llama"), tok, SOURCE, TARGET, worker.MODULES, progress=False, **kw)
    )
    return {
        "dp": train(**worker.SETTINGS),
        "e2e": train(**worker.E2E),
        "linear_act": worker.maps_of(
            lf.fit_linear_act(tiny_model("llama"), tok, SOURCE, TARGET, worker.MODULES)
        ),
        "grad": worker.grad_of_global_batch(tiny_model("llama"), tok),
        "gates": worker.gated_mean_shift(tiny_model("llama"), tok),
        "adam": train(**worker.ADAM),
        "sgd": train(**worker.SGD),
    }


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    report = tmp_path_factory.mktemp("two")
    torchrun(
        report, 2, "dp", "grad", "linear_act", "e2e", "gates", "differ", "refuse", "fsdp", "fsdp_meta",
        "fsdp_meta0", "adam", "sgd", "weights", "fsdp_weights", "few",
    )  # fmt: skip
    return report


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    report = tmp_path_factory.mktemp("three")
    torchrun(report, 3, "dp", "grad")
    return report


@pytest.mark.parametrize("nproc", [2, 3])
def test_data_parallel_equals_one_process(single, two, three, nproc):
    outs = report_of(two if nproc == 2 else three, "dp", nproc)
    assert_same_on_every_rank(outs)
    assert max_diff(outs[0]["maps"], single["dp"]) <= MAP_ATOL
    # the maps moved away from the identity (the comparison is not trivially true)
    moved = max(max(float((om - 1).abs().max()), float(b.abs().max())) for om, b in single["dp"].values())
    assert moved > 1e-3
    meta = outs[0]["metadata"]
    assert (meta["world_size"], meta["fsdp"]) == (nproc, False)
    assert len(meta["history"]) == worker.SETTINGS["steps"]


@pytest.mark.parametrize("nproc", [2, 3])
def test_gradient_through_the_gather_equals_one_process(single, two, three, nproc):
    outs = report_of(two if nproc == 2 else three, "grad", nproc)
    ref = single["grad"]
    assert float(ref["omega"].abs().max()) > 1e-4  # a gradient that can be wrong
    for out in outs:
        assert torch.equal(out["loss"], ref["loss"])
        # all_gather from torch.distributed.nn would give nproc × this in backward
        assert float((out["omega"] - ref["omega"]).abs().max()) <= GRAD_ATOL
        assert float((out["bias"] - ref["bias"]).abs().max()) <= GRAD_ATOL


def test_fsdp_with_data_parallel_equals_one_process(single, two):
    outs = report_of(two, "fsdp", 2)
    assert_same_on_every_rank(outs)
    assert max_diff(outs[0]["maps"], single["dp"]) <= MAP_ATOL
    assert (outs[0]["metadata"]["world_size"], outs[0]["metadata"]["fsdp"]) == (2, True)
    # the sharded model's fingerprint (names, global shapes) is the unsharded model's
    assert outs[0]["metadata"]["model"] == report_of(two, "dp", 1)[0]["metadata"]["model"]


@pytest.mark.parametrize("optimizer, atol", [("sgd", MAP_ATOL), ("adam", ADAM_ATOL)])
def test_what_the_same_maps_means_per_optimizer(single, two, optimizer, atol):
    """SGD: the single-process maps to float rounding; Adam: within its documented bound (the
    same run, another optimizer; see the module docstring and docs/distributed.md)."""
    outs = report_of(two, optimizer, 2)
    assert_same_on_every_rank(outs)
    ref = single[optimizer]
    moved = max(max(float((om - 1).abs().max()), float(b.abs().max())) for om, b in ref.values())
    assert moved > 1e-2  # the maps moved: a difference could show
    assert max_diff(outs[0]["maps"], ref) <= atol


@pytest.mark.parametrize("scenario", ["weights", "fsdp_weights"])
def test_ranks_holding_other_weights_are_refused_on_every_rank_by_name(two, scenario):
    # rank 1 loaded weights of another seed (a stale checkpoint on one node); under FSDP too, where
    # its own weights would otherwise become its shards of a mixed model
    for out in report_of(two, scenario, 2):
        assert out["error"] is not None
        assert out["error"].startswith("DistributedError: ranks [1] hold other weights than rank 0")


def test_too_few_sentences_for_the_ranks_names_the_count_given(two):
    for out in report_of(two, "few", 2):
        assert out["error"].startswith("ArgumentError: 1 source sentence for 2 processes (WORLD_SIZE=2)")
        assert out["argument"] == "source"  # the CLI names --source, not a --batch-size never given


def test_gated_training_with_control_equals_one_process(single, two):
    outs = report_of(two, "e2e", 2)
    assert_same_on_every_rank(outs)
    assert_same_on_every_rank(outs, "gates")
    assert max_diff(outs[0]["maps"], single["e2e"]) <= MAP_ATOL


def test_linear_act_fit_gathers_its_statistics(single, two):
    outs = report_of(two, "linear_act", 2)
    assert_same_on_every_rank(outs)
    assert max_diff(outs[0]["maps"], single["linear_act"]) <= MAP_ATOL
    assert outs[0]["metadata"]["world_size"] == 2


def test_mean_shift_and_gate_fits_gather_their_statistics(single, two):
    outs = report_of(two, "gates", 2)
    assert_same_on_every_rank(outs)
    assert_same_on_every_rank(outs, "gates")
    assert max_diff(outs[0]["maps"], single["gates"]["maps"]) <= MAP_ATOL
    ref = single["gates"]["gates"]
    assert ref  # gates were fitted
    for m, (w, c) in outs[0]["gates"].items():
        assert torch.allclose(w, ref[m][0], rtol=1e-4, atol=1e-5)
        assert torch.allclose(c, ref[m][1], rtol=1e-4, atol=1e-5)


def test_rank_zero_alone_writes(two):
    # each rank was given its own checkpoint path: only rank 0's exists, complete
    assert sorted(p.name for p in (two / "dp-files").iterdir()) == ["ck-rank0.pt"]
    state = torch.load(two / "dp-files" / "ck-rank0.pt", weights_only=False)
    assert state["step"] == worker.SETTINGS["steps"]


def test_a_rank_refusing_its_arguments_stops_every_rank_by_name(two):
    refuse = [o["error"] for o in report_of(two, "refuse", 2)]
    assert refuse[1].startswith("ArgumentError: lr must be > 0, got -1.0")
    assert refuse[0].startswith("DistributedError: rank 1 refused its arguments")
    assert "lr must be > 0" in refuse[0]
    differ = [o["error"] for o in report_of(two, "differ", 2)]
    for msg in differ:
        assert msg.startswith("DistributedError: ranks [1] were given different")


def test_a_rank_failing_mid_run_ends_the_job_with_its_error(tmp_path):
    proc = torchrun(tmp_path, 2, "raise", check=False)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose at step 2" in proc.stderr
    assert not (tmp_path / "raise-rank0.pt").exists()


def test_a_rank_vanishing_mid_run_makes_the_others_fail_not_hang(tmp_path):
    proc = torchrun(tmp_path, 2, "die", check=False)
    assert proc.returncode != 0
    assert "DistributedError: the " in proc.stderr
    assert "collective failed on rank 0 of 2" in proc.stderr
    assert not (tmp_path / "die-rank0.pt").exists()


def test_resume_after_sigkill_of_the_whole_job_equals_uninterrupted(single, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in worker_env_keys()}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(TESTS / "distributed_worker.py"), str(tmp_path), "slow",
    ]  # fmt: skip
    ck = tmp_path / "slow-files" / "ck.pt"
    log = tmp_path / "slow.log"
    with open(log, "w") as err:
        job = subprocess.Popen(cmd, env=env, stdout=err, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not ck.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the launcher and every rank at once
        job.wait(timeout=60)
    assert ck.exists(), log.read_text()[-3000:]
    interrupted_at = torch.load(ck, weights_only=False)["step"]
    assert 1 <= interrupted_at < worker.SETTINGS["steps"]
    torchrun(tmp_path, 2, "resume")
    outs = report_of(tmp_path, "resume", 2)
    assert_same_on_every_rank(outs)
    assert max_diff(outs[0]["maps"], single["dp"]) <= MAP_ATOL
    assert len(outs[0]["metadata"]["history"]) == worker.SETTINGS["steps"]


def test_sigterm_to_the_job_checkpoints_once_at_the_next_read_and_exits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in worker_env_keys()}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(TESTS / "distributed_worker.py"), str(tmp_path), "term",
    ]  # fmt: skip
    log = tmp_path / "term.log"
    with open(log, "w") as err:
        job = subprocess.Popen(cmd, env=env, stdout=err, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (tmp_path / "term-step0").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)  # to torchrun, which passes it to every rank
        job.wait(timeout=LAUNCH_TIMEOUT)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=60)
    assert job.returncode != 0
    ck = tmp_path / "term-files" / "ck.pt"
    assert ck.exists(), log.read_text()[-3000:]
    step = torch.load(ck, weights_only=False)["step"]
    # the ranks act on the signal together where the records are read (every read_every steps)
    assert step % worker.SETTINGS["read_every"] == 0 and step < worker.SETTINGS["steps"]
    assert not (tmp_path / "term-rank0.pt").exists() and not (tmp_path / "term-rank1.pt").exists()


def test_fsdp_ranks_on_the_meta_device_get_their_shards_from_rank_0(single, two):
    outs = report_of(two, "fsdp_meta", 2)
    assert_same_on_every_rank(outs)
    # rank 1 built its model on the meta device (no weights, no rotary buffers): had its shards
    # or buffers not come from rank 0, its forwards and so the common maps would differ
    assert max_diff(outs[0]["maps"], single["dp"]) <= MAP_ATOL
    assert outs[0]["metadata"]["fsdp"] is True


def test_fsdp_with_rank_0_on_the_meta_device_is_refused_on_every_rank(two):
    for out in report_of(two, "fsdp_meta0", 2):
        assert out["error"] is not None and "rank 0 holds 30 of its 30 parameters on the meta" in out["error"]


def test_accelerate_launch_runs_data_parallel_like_torchrun(single, tmp_path):
    """``accelerate launch --multi_gpu`` starts its processes through torch.distributed.run
    with the same environment (on this CPU machine: gloo): the library needs nothing of
    accelerate's and gives the single-process maps."""
    pytest.importorskip("accelerate")
    env = {k: v for k, v in os.environ.items() if k not in worker_env_keys()}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(TESTS / "distributed_worker.py"), str(tmp_path), "dp",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outs = report_of(tmp_path, "dp", 2)
    assert_same_on_every_rank(outs)
    assert outs[0]["metadata"]["world_size"] == 2
    assert max_diff(outs[0]["maps"], single["dp"]) <= MAP_ATOL


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_model_on_the_meta_device_reads_no_weights(tmp_path):
    from lineas_fast.cli.common import load_model

    tiny_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a weight file")
    model, tok = load_model(str(tmp_path), on_meta=True)
    assert all(p.is_meta for p in model.parameters()) and tok is not None
    ref = tiny_model("llama")
    assert [(n, p.shape, p.dtype) for n, p in model.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in ref.named_parameters()
    ]
    with pytest.raises(lf.cli.errors.CLIError, match="cannot load a causal LM"):
        load_model(str(tmp_path))  # the same folder, read: its broken weights are found


def test_cli_train_under_torchrun_with_fsdp_equals_one_process(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (tmp_path / "src.txt").write_text("\n".join(SOURCE) + "\n")
    (tmp_path / "tgt.txt").write_text("\n".join(TARGET) + "\n")
    flags = [
        "train", "--model", str(model_dir), "--source", str(tmp_path / "src.txt"),
        "--target", str(tmp_path / "tgt.txt"), "--modules", worker.MODULES, "--steps", "4",
        "--batch-size", "5", "--optimizer", "sgd", "--lr", "0.1", "--seed", "3",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in worker_env_keys()}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cli = [sys.executable, "-c", "import sys; from lineas_fast.cli import main; sys.exit(main())"]
    one = subprocess.run(
        [*cli, *flags, "--out", str(tmp_path / "one.safetensors")],
        env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    script = tmp_path / "cli.py"
    script.write_text("import sys\nfrom lineas_fast.cli import main\nsys.exit(main())\n")
    two = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            str(script), *flags, "--fsdp", "--out", str(tmp_path / "two.safetensors"),
        ],
        env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    a = lf.Steering.load(str(tmp_path / "one.safetensors"))
    b = lf.Steering.load(str(tmp_path / "two.safetensors"))
    assert (a.metadata["world_size"], b.metadata["world_size"], b.metadata["fsdp"]) == (1, 2, True)
    for m in a.modules:
        for x, y in zip(a[m], b[m]):
            assert float((x - y).abs().max()) <= MAP_ATOL


def test_one_process_without_a_launcher_is_single_process():
    assert setup() is None
    with pytest.raises(lf.checks.ArgumentError, match="fsdp=True.*torchrun"):
        setup(fsdp=True)
    with pytest.raises(lf.checks.ArgumentError, match="distributed must be None, True or False"):
        setup("yes")
    assert issubclass(DistributedError, RuntimeError)
