"""One rank of the distributed tests (tests/cpu/test_distributed.py), started by torchrun.

Usage: python -m torch.distributed.run --standalone --nproc-per-node N tests/distributed_worker.py
       REPORT_DIR SCENARIO [SCENARIO ...]

Each scenario runs the library on the tiny Llama with the settings of ``SETTINGS`` (the test
runs the same settings in one process) and every rank saves what it got to
REPORT_DIR/<scenario>-rank<r>.pt (the test's own report, apart from the library's writes, which
go to REPORT_DIR/<scenario>-files/). Scenarios:

* dp: ``lf.train`` checkpointing every 3 steps to files/ck-rank<r>.pt (each rank names its own
  path, so a file from a rank other than 0 would show) -> maps, metadata
* e2e: ``lf.train`` with gate="e2e" and control sentences -> maps, gates
* linear_act: ``lf.fit_linear_act`` -> maps
* gates: ``lf.fit_mean_shift``, then ``lf.fit_gates`` (sentence level) on it -> maps, gates
* grad: the loss of one global batch read over the ranks, backward, gradients summed over the
  ranks -> the gradient of ω and b at the first module
* fsdp: ``lf.train(..., fsdp=True)`` (the model sharded by FSDP2) -> maps, metadata
* fsdp_meta: as fsdp, ranks other than 0 building the model on the meta device (their shards
  come from rank 0) -> maps, metadata
* fsdp_meta0: as fsdp, rank 0 building the model on the meta device -> the error of every rank
* adam, sgd: ``lf.train`` with ``ADAM`` / ``SGD`` (60 steps, alike but for the optimizer) -> maps
* few: one source sentence for the ranks -> the error of every rank
* weights: rank 1 loads other weights (another seed) -> the error of every rank
* fsdp_weights: as weights, with fsdp=True and rank 1's weights loaded (not on the meta device)
  -> the error of every rank
* differ: rank 1 is given other source sentences -> the error message of every rank
* refuse: rank 1 is given a bad learning rate -> the error message of every rank
* raise: rank 1 raises inside training at step 2 (the job must end, not hang)
* die: rank 1 exits (status 0, no error) inside training at step 2: rank 0 must fail
* resume: ``lf.train`` resumed from REPORT_DIR/slow-files/ck.pt (written by ``slow``)
* slow: as dp, with a callback that sleeps, for a SIGKILL of the whole job mid-run
* term: a checkpoint path but no periodic checkpoints, a callback that sleeps and marks each
  step in REPORT_DIR/term-step<k> (rank 0), for a SIGTERM to the job mid-run
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer  # noqa: E402

import lineas_fast as lf  # noqa: E402
from lineas_fast.training.distributed import setup  # noqa: E402
from lineas_fast.wasserstein import TargetProfile, sliced_wasserstein  # noqa: E402

MODULES = NORMS["llama"]
# batch 5 over 2 or 3 ranks: uneven shares; sparsity on, so the proximal step runs too; SGD, whose
# step is proportional to the gradient (Adam's hardly sees a gradient scaled by the world size)
SETTINGS = dict(steps=6, batch_size=5, optimizer="sgd", lr=0.1, sparsity=0.01, seed=3, read_every=2)
E2E = dict(SETTINGS, optimizer="adam", lr=0.05, gate="e2e", control=TARGET[::-1], control_weight=0.5)
# one longer run per optimizer, alike but for the optimizer (what "the same maps" means for each)
LONG = dict(steps=60, batch_size=5, sparsity=0.0, seed=3, read_every=20)
ADAM = dict(LONG, optimizer="adam", lr=0.05)
SGD = dict(LONG, optimizer="sgd", lr=0.5)
TIMEOUT = 60.0


def maps_of(steering):
    return {m: tuple(t.detach().cpu() for t in steering[m]) for m in steering.modules}


def grad_of_global_batch(model, tok, ranks=None):
    """∂ loss / ∂ (ω, b) of the first module for one fixed global batch, ω and b not the
    identity (so the gradient is not special). With ``ranks`` the batch is read over them."""
    from lineas_fast.targets import as_target

    t = as_target(model, tok)
    names = t.match(MODULES)
    src, tgt = t.encode(SOURCE), t.encode(TARGET)
    g = torch.Generator().manual_seed(1)
    om = (1 + 0.1 * torch.randn(32, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(32, generator=g)).requires_grad_()
    idx = [6, 1, 4, 0, 7]
    with t.frozen(), lf.Steering({names[0]: (om, b)}).attach(t, strict=False):
        if ranks is None:
            with torch.no_grad():
                ref = t.pooled(tgt, names)
            acts = t.pooled(src, names, idx)
        else:
            with torch.no_grad():
                ref = ranks.read(t, tgt, names)
            acts = ranks.read(t, src, names, idx)
        profiles = [TargetProfile(ref[m], len(idx)) for m in names]
        loss = sliced_wasserstein([acts[m] for m in names], profiles)
        loss.backward()
    if ranks is not None:
        ranks.reduce_grads([om, b])
    return {"loss": loss.detach(), "omega": om.grad.clone(), "bias": b.grad.clone()}


def gated_mean_shift(model, tok):
    """Mean-shift maps with sentence-level gates (source vs the targets as control)."""
    shift = lf.fit_mean_shift(model, tok, SOURCE, TARGET, MODULES)
    s = lf.fit_gates(model, tok, SOURCE, TARGET, shift, threshold=0.0)
    return {"maps": maps_of(s), "gates": {m: (g["w"].detach(), g["c"].detach()) for m, g in s.gates.items()}}


def run(scenario: str, report: Path, rank: int) -> dict:
    files = report / f"{scenario}-files"
    files.mkdir(exist_ok=True)
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    common = dict(progress=False, timeout=TIMEOUT)
    if scenario == "dp":
        s = lf.train(
            model, tok, SOURCE, TARGET, MODULES, **SETTINGS, **common,
            checkpoint_every=3, checkpoint_path=str(files / f"ck-rank{rank}.pt"),
        )  # fmt: skip
        return {"maps": maps_of(s), "metadata": s.metadata}
    if scenario == "slow":

        def nap(rec):
            time.sleep(0.5)

        s = lf.train(
            model, tok, SOURCE, TARGET, MODULES, **SETTINGS, **common, callback=nap,
            checkpoint_every=1, checkpoint_path=str(files / "ck.pt"),
        )  # fmt: skip
        return {"maps": maps_of(s)}
    if scenario == "term":

        def mark(rec):
            if rank == 0:
                (report / f"term-step{rec.step}").touch()
            time.sleep(0.5)

        s = lf.train(
            model, tok, SOURCE, TARGET, MODULES, **SETTINGS, **common, callback=mark,
            checkpoint_path=str(files / "ck.pt"),
        )  # fmt: skip
        return {"maps": maps_of(s)}
    if scenario == "resume":
        ck = report / "slow-files" / "ck.pt"
        s = lf.train(
            model, tok, SOURCE, TARGET, MODULES, **SETTINGS, **common,
            checkpoint_every=1, checkpoint_path=str(ck), resume_from=str(ck),
        )  # fmt: skip
        return {"maps": maps_of(s), "metadata": s.metadata}
    if scenario == "e2e":
        s = lf.train(model, tok, SOURCE, TARGET, MODULES, **E2E, **common)
        gates = {m: (g["w"].detach(), g["c"].detach()) for m, g in s.gates.items()}
        return {"maps": maps_of(s), "gates": gates}
    if scenario == "linear_act":
        s = lf.fit_linear_act(model, tok, SOURCE, TARGET, MODULES)
        return {"maps": maps_of(s), "metadata": s.metadata}
    if scenario == "gates":
        return gated_mean_shift(model, tok)
    if scenario == "grad":
        return grad_of_global_batch(model, tok, setup(timeout=TIMEOUT))
    if scenario == "fsdp":
        s = lf.train(model, tok, SOURCE, TARGET, MODULES, **SETTINGS, **common, fsdp=True)
        return {"maps": maps_of(s), "metadata": s.metadata}
    if scenario == "fsdp_meta":  # ranks other than 0 build the model on the meta device
        if rank != 0:
            with torch.device("meta"):
                model = tiny_model("llama", seed=1)  # another seed: weights must come from rank 0
        s = lf.train(model, tok, SOURCE, TARGET, MODULES, **SETTINGS, **common, fsdp=True)
        return {"maps": maps_of(s), "metadata": s.metadata}
    if scenario == "fsdp_meta0":  # rank 0 on the meta device: refused on every rank
        if rank == 0:
            with torch.device("meta"):
                model = tiny_model("llama")
        try:
            lf.train(model, tok, SOURCE, TARGET, MODULES, **SETTINGS, **common, fsdp=True)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            return {"error": f"{type(e).__name__}: {e}"}
        return {"error": None}
    if scenario in ("adam", "sgd"):
        settings = ADAM if scenario == "adam" else SGD
        return {"maps": maps_of(lf.train(model, tok, SOURCE, TARGET, MODULES, **settings, **common))}
    if scenario == "few":
        try:
            lf.train(model, tok, SOURCE[:1], TARGET, MODULES, **SETTINGS, **common)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            return {"error": f"{type(e).__name__}: {e}", "argument": getattr(e, "argument", None)}
        return {"error": None}
    if scenario in ("weights", "fsdp_weights"):
        if rank == 1:
            model = tiny_model("llama", seed=1)  # a stale or other checkpoint on one node
        try:
            lf.train(
                model, tok, SOURCE, TARGET, MODULES, **SETTINGS, **common, fsdp=scenario == "fsdp_weights"
            )
        except Exception as e:  # noqa: BLE001 - the test reads the message
            return {"error": f"{type(e).__name__}: {e}"}
        return {"error": None}
    if scenario in ("differ", "refuse"):
        source = SOURCE[::-1] if scenario == "differ" and rank == 1 else SOURCE
        lr = -1.0 if scenario == "refuse" and rank == 1 else SETTINGS["lr"]
        try:
            lf.train(model, tok, source, TARGET, MODULES, **dict(SETTINGS, lr=lr), **common)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            return {"error": f"{type(e).__name__}: {e}"}
        return {"error": None}
    if scenario == "raise":

        def fail(rec):
            if rank == 1 and rec.step == 2:
                raise RuntimeError("rank 1 fails on purpose at step 2")

        lf.train(model, tok, SOURCE, TARGET, MODULES, **SETTINGS, **common, callback=fail)
        return {}
    if scenario == "die":

        def vanish(rec):
            if rank == 1 and rec.step == 2:
                os._exit(0)

        lf.train(model, tok, SOURCE, TARGET, MODULES, **SETTINGS, **common, callback=vanish)
        return {}
    raise SystemExit(f"unknown scenario {scenario!r}")


def main() -> None:
    report, scenarios = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for scenario in scenarios:
        out = run(scenario, report, rank)
        torch.save(out, report / f"{scenario}-rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
