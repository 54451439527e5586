"""Long training survives signals and resumes exactly: SIGTERM / Ctrl-C write a checkpoint
before the process stops, a run SIGKILLed at a random step resumes to the uninterrupted result
bit for bit, and a checkpoint of another model, other data or other settings is refused with
every difference listed. A non-finite trained map is an error, never a returned Steering."""

import json
import os
import random
import signal
import subprocess
import sys
import threading

import pytest
import torch
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
import lineas_fast.training.trainer as trainer

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
KW = dict(
    modules=NORMS["llama"], steps=STEPS, batch_size=4, optimizer="adam", lr=0.05, progress=False, seed=3
)
# a training process that reports each step and dawdles, so a signal lands mid-run
TRAIN = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
import lineas_fast as lf
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer
ck, every, kw = sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
def report(rec):
    print(f"step {rec.step}", flush=True)
    time.sleep(0.2)
lf.train(tiny_model("llama"), tiny_tokenizer(), SOURCE, TARGET, checkpoint_every=every,
         checkpoint_path=ck, callback=report, **kw)
print("finished", flush=True)
"""


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def uninterrupted(tok):
    return lf.train(tiny_model("llama"), tok, SOURCE, TARGET, **KW)


def assert_same_run(a, b):
    assert a.modules == b.modules
    for n in a.modules:
        assert torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]), n
    assert a.metadata["history"] == b.metadata["history"]  # losses, support, lr: exact


def start_training(ck, every):
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            TRAIN,
            TESTS,
            str(torch.get_num_threads()),
            str(ck),
            str(every),
            json.dumps(KW),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(proc, step, timeout=90.0):
    done = threading.Event()
    seen = []

    def read():
        for line in proc.stdout:
            seen.append(line)
            if line.strip() == f"step {step}":
                done.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout), f"no step {step}: {''.join(seen)} {proc.stderr.read()[-2000:]}"


def leftovers(folder):
    return [e for e in os.listdir(folder) if e.startswith(".lineas-")]


def test_signals_write_a_checkpoint_and_a_killed_run_resumes_exactly(tmp_path, tok, uninterrupted):
    """Two training processes at once. One gets SIGTERM during step 2 (no periodic checkpoint
    due): it finishes the step, writes the checkpoint and dies by SIGTERM. The other checkpoints
    every 2 steps and is SIGKILLed at a random step. Both resume to the uninterrupted result,
    bit for bit, and leave no temporary file."""
    kill_at = random.Random(11).randint(3, STEPS - 2)
    term_dir, kill_dir = tmp_path / "term", tmp_path / "kill"
    term_dir.mkdir(), kill_dir.mkdir()
    term_ck, kill_ck = term_dir / "ck.pt", kill_dir / "ck.pt"
    term, kill = start_training(term_ck, 100), start_training(kill_ck, 2)
    wait_for_step(term, 2)
    term.send_signal(signal.SIGTERM)
    wait_for_step(kill, kill_at)
    kill.kill()
    assert term.wait(60) == -signal.SIGTERM and kill.wait(60) == -signal.SIGKILL
    # the step under way when the signal came is completed, then saved (3 unless the machine
    # was so slow that the signal arrived after step 2's callback)
    assert 3 <= torch.load(term_ck, weights_only=True)["step"] < STEPS
    kill_step = torch.load(kill_ck, weights_only=True)["step"]
    assert kill_step % 2 == 0 and 2 * ((kill_at + 1) // 2) <= kill_step < STEPS
    assert leftovers(term_dir) == []  # SIGTERM: nothing left behind
    for ck in (term_ck, kill_ck):
        resumed = lf.train(
            tiny_model("llama"),
            tok,
            SOURCE,
            TARGET,
            resume_from=str(ck),
            checkpoint_every=2,
            checkpoint_path=str(ck),
            **KW,
        )
        assert_same_run(resumed, uninterrupted)
        assert leftovers(ck.parent) == []  # the next write cleaned up


def test_ctrl_c_saves_then_raises_and_handlers_are_restored(ctrl_c_raises, tmp_path, tok, uninterrupted):
    ck = str(tmp_path / "ck.pt")
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def ctrl_c(rec):
        if rec.step == 4:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        lf.train(tiny_model("llama"), tok, SOURCE, TARGET, checkpoint_path=ck, callback=ctrl_c, **KW)
    assert {s: signal.getsignal(s) for s in before} == before
    assert torch.load(ck, weights_only=True)["step"] == 5
    resumed = lf.train(tiny_model("llama"), tok, SOURCE, TARGET, resume_from=ck, **KW)
    assert_same_run(resumed, uninterrupted)

    # a handler of the program's own runs after the checkpoint is written
    class Stop(Exception):
        pass

    def own(signum, frame):
        raise Stop(torch.load(ck, weights_only=True)["step"])

    def term(rec):
        if rec.step == 1:
            signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with pytest.raises(Stop) as err:
            lf.train(tiny_model("llama"), tok, SOURCE, TARGET, checkpoint_path=ck, callback=term, **KW)
        assert err.value.args == (2,) and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_training_outside_the_main_thread_installs_no_handler(tmp_path, tok):
    out, errors = [], []

    def run():
        try:
            out.append(
                lf.train(
                    tiny_model("llama"),
                    tok,
                    SOURCE,
                    TARGET,
                    checkpoint_every=1,
                    checkpoint_path=str(tmp_path / "ck.pt"),
                    **{**KW, "steps": 2},
                )
            )
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not errors and out and torch.load(tmp_path / "ck.pt", weights_only=True)["step"] == 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    ck = str(tmp_path_factory.mktemp("resume") / "ck.pt")
    lf.train(
        tiny_model("llama"), tok, SOURCE, TARGET, checkpoint_every=2, checkpoint_path=ck, **{**KW, "steps": 2}
    )
    return ck


def refusal(ck, model=None, source=SOURCE, target=TARGET, **kw):
    with pytest.raises(ValueError) as err:
        lf.train(
            model or tiny_model("llama"),
            tiny_tokenizer(),
            source,
            target,
            resume_from=ck,
            **{**KW, "steps": 2, **kw},
        )
    return str(err.value)


def test_resume_refuses_another_model_other_data_or_settings(checkpoint):
    msg = refusal(checkpoint, model=tiny_model("qwen2"))
    assert "1 difference" in msg and "model" in msg and "'llama'" in msg and "'qwen2'" in msg
    msg = refusal(checkpoint, model=tiny_model("llama", seed=1))  # same shapes, other weights
    assert "1 difference" in msg and "weights sample" in msg
    msg = refusal(checkpoint, target=TARGET[:-1])
    assert "1 difference" in msg and "target sentences: saved 9" in msg and "now 8" in msg
    msg = refusal(checkpoint, lr=0.01)
    assert "other settings" in msg and "setting lr: saved 0.05, now 0.01" in msg
    msg = refusal(checkpoint, model=tiny_model("qwen2"), source=SOURCE[::-1], lr=0.01, max_length=64)
    assert "4 difference" in msg, msg  # model, source, lr, max_length
    for part in ("model", "source sentences", "setting lr", "setting max_length"):
        assert part in msg


def test_resume_refuses_what_is_not_a_checkpoint(tmp_path, checkpoint):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        refusal_free(missing)
    steering = tmp_path / "s.safetensors"
    lf.Steering({"m": (torch.ones(2), torch.zeros(2))}).save(str(steering))
    junk, other, empty = tmp_path / "junk.pt", tmp_path / "other.pt", tmp_path / "empty.pt"
    junk.write_bytes(os.urandom(300))
    torch.save({"step": 3, "maps": {}}, other)
    empty.write_bytes(b"")
    hints = {steering: "safetensors", junk: "not the zip archive", other: "marker", empty: "empty"}
    for path, hint in hints.items():
        with pytest.raises(ValueError, match="not a lineas_fast training checkpoint") as err:
            refusal_free(str(path))
        assert str(path) in str(err.value) and hint in str(err.value)
    with pytest.raises(IsADirectoryError, match="folder"):
        refusal_free(str(tmp_path))
    with pytest.raises(IsADirectoryError, match="checkpoint_path"):  # before any work
        lf.train(
            tiny_model("llama"),
            tiny_tokenizer(),
            SOURCE,
            TARGET,
            checkpoint_every=1,
            checkpoint_path=str(tmp_path),
            **KW,
        )


def refusal_free(path):
    lf.train(tiny_model("llama"), tiny_tokenizer(), SOURCE, TARGET, resume_from=path, **{**KW, "steps": 2})


PROXIMAL = trainer.proximal_maps


def poison_from(monkeypatch, clean_steps: int):
    """The proximal step (run once per step, after the optimizer's) fills the maps with NaN
    from step ``clean_steps`` on (the loss of the step that does it is still finite: it was
    computed before the update)."""
    count = [0]

    def poisoned(maps, *args):
        maps = list(maps)
        PROXIMAL(maps, *args)
        count[0] += 1
        if count[0] > clean_steps:
            for om, _ in maps:
                om.detach().fill_(float("nan"))

    monkeypatch.setattr(trainer, "proximal_maps", poisoned)


def test_non_finite_maps_are_never_returned_or_saved(tmp_path, tok, monkeypatch):
    poison_from(monkeypatch, 0)
    with pytest.raises(lf.TrainingDivergedError, match="not finite") as err:
        lf.train(tiny_model("llama"), tok, SOURCE, TARGET, **{**KW, "steps": 1})
    assert "model.layers.0.post_attention_layernorm" in str(err.value)
    ck = tmp_path / "ck.pt"
    poison_from(monkeypatch, 1)  # step 0 clean, step 1 poisoned
    with pytest.raises(lf.TrainingDivergedError, match="after step 2") as err:
        lf.train(
            tiny_model("llama"),
            tok,
            SOURCE,
            TARGET,
            checkpoint_every=1,
            checkpoint_path=str(ck),
            **{**KW, "steps": 2},
        )
    assert str(ck) in str(err.value)
    state = torch.load(ck, weights_only=True)  # the last good one, untouched
    assert state["step"] == 1
    assert all(torch.isfinite(om).all() and torch.isfinite(b).all() for om, b in state["maps"].values())
    assert leftovers(tmp_path) == []


def test_a_pipeline_run_on_fresh_shared_noise_resumes_exactly(tmp_path):
    """A diffusers pipeline draws fresh noise every step from the run's generator: stopped
    after 3 steps (checkpoint at 2) and resumed, it gives the uninterrupted maps and losses bit
    for bit; the checkpoint is refused by a run on independent noise (shared_noise=False)."""
    pytest.importorskip("diffusers")
    from tiny_pipeline import SOURCE_PROMPTS, TARGET_PROMPTS, tiny_pipeline

    from lineas_fast.targets import PipelineTarget

    pipe = tiny_pipeline()
    kw = dict(
        modules=r"unet\..*norm\d?", steps=6, batch_size=4, optimizer="adam", lr=0.01, progress=False, seed=5
    )
    uninterrupted = lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, **kw)
    ck = str(tmp_path / "ck.pt")
    with lf.Trainer(
        pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, checkpoint_every=2, checkpoint_path=ck, **kw
    ) as run:
        for _ in range(3):
            run.step()
    assert torch.load(ck, weights_only=True)["step"] == 2
    resumed = lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, resume_from=ck, **kw)
    assert_same_run(resumed, uninterrupted)
    with pytest.raises(ValueError, match=r"(?s)1 difference.*reading shared_noise: saved True, now None"):
        lf.train(
            PipelineTarget(pipe, seed=5, shared_noise=False),
            None,
            SOURCE_PROMPTS,
            TARGET_PROMPTS,
            resume_from=ck,
            **kw,
        )
