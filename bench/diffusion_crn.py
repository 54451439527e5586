"""Common random numbers for diffusion steering: held-out pooled W2 before and after training,
independent noise (``shared_noise=False``: the target read once on fixed noise) against shared
noise (the default: each step's source and target samples on one fresh noise draw).

    python bench/diffusion_crn.py        # the tiny random SD pipeline of the tests, CPU

The held-out measure is the LinEAS loss (``sliced_wasserstein``, reduction "reference", over
every steered UNet norm) between the steered source prompts and the unsteered target prompts,
sample k of both on the same noise from a seed training never uses (prompt k mod 5 against
prompt k mod 6). "early" modules are those whose activations are the same for every prompt
under equal noise (before the first cross-attention, found by reading them): the right map
there is the identity, so their maps' movement measures how much noise a run learnt.
Writes bench/results/diffusion-crn-cpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import environment, write_json  # noqa: E402

import lineas_fast as lf  # noqa: E402
from lineas_fast.targets import PipelineTarget  # noqa: E402
from lineas_fast.wasserstein import sliced_wasserstein  # noqa: E402

NORMS = r"unet\..*norm\d?"
HELD_OUT_SEED = 1234


def held_out(target: PipelineTarget, prompts, k: int, seed: int = HELD_OUT_SEED) -> dict:
    """k samples, sample j prompt j mod len(prompts), on noise row j of a ``seed`` draw."""
    enc = target.encode([prompts[j % len(prompts)] for j in range(k)], "held-out")
    return target.with_noise(enc, range(k), target.draw_noise(k, torch.Generator().manual_seed(seed)))


@torch.no_grad()
def pooled_w2(target, names, src, tgt, steering=None) -> dict:
    """(steered source reads, target reads, W2 over ``names``): the held-out pooled W2."""
    y = target.pooled(tgt, names)
    if steering is None:
        x = target.pooled(src, names)
    else:
        with steering.apply(target):
            x = target.pooled(src, names)
    return x, y, sliced_wasserstein([x[n] for n in names], [y[n] for n in names]).item()


def movement(steering, names) -> float:
    """Σ over ``names`` of ‖(ω − 1, b)‖₂: how far the maps are from the identity."""
    return sum(
        float(((steering[n][0] - 1).square().sum() + steering[n][1].square().sum()).sqrt()) for n in names
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--held-out", type=int, default=120, help="held-out samples per prompt set")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from tiny_pipeline import SOURCE_PROMPTS, TARGET_PROMPTS, tiny_pipeline

    pipe = tiny_pipeline()
    probe = PipelineTarget(pipe)
    names = probe.match(NORMS)
    src = held_out(probe, SOURCE_PROMPTS, args.held_out)
    tgt = held_out(probe, TARGET_PROMPTS, args.held_out)
    x, y, identity_w2 = pooled_w2(probe, names, src, tgt)
    early = [n for n in names if torch.equal(x[n], y[n])]
    runs = []
    for optimizer, lr in (("adam", 1e-2), ("adam", 3e-3), ("sgd", 0.1)):
        for batch_size in (len(SOURCE_PROMPTS), 4):
            for shared in (False, True):
                target = PipelineTarget(pipe, shared_noise=shared)
                hist = []
                t0 = time.perf_counter()
                st = lf.train(
                    target,
                    None,
                    SOURCE_PROMPTS,
                    TARGET_PROMPTS,
                    modules=NORMS,
                    steps=args.steps,
                    optimizer=optimizer,
                    lr=lr,
                    batch_size=batch_size,
                    progress=False,
                    callback=hist.append,
                )
                seconds = time.perf_counter() - t0
                xs, _, w2 = pooled_w2(target, names, src, tgt, st)
                early_w2 = sliced_wasserstein([xs[n] for n in early], [y[n] for n in early]).item()
                first, last = hist[0].loss, hist[-1].loss
                k = min(5, len(hist))
                runs.append(
                    {
                        "noise": "shared" if shared else "independent",
                        "optimizer": optimizer,
                        "lr": lr,
                        "batch_size": batch_size,
                        "steps": args.steps,
                        "train_loss_first": first,
                        "train_loss_last": last,
                        "train_loss_rel_decrease": (first - last) / first,
                        "train_loss_first5_mean": sum(r.loss for r in hist[:k]) / k,
                        "train_loss_last5_mean": sum(r.loss for r in hist[-k:]) / k,
                        "held_out_w2_before": identity_w2,
                        "held_out_w2_after": w2,
                        "held_out_rel_change": (w2 - identity_w2) / identity_w2,
                        "held_out_w2_early_after": early_w2,
                        "movement_early": movement(st, early),
                        "movement_all": movement(st, names),
                        "train_s": seconds,
                    }
                )
                print(
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in runs[-1].items()}, flush=True
                )
    import diffusers

    result = {
        "pipeline": f"tiny random SD pipeline (tests/tiny_pipeline.py), fp32, timestep {probe.timestep}",
        "modules": NORMS,
        "n_modules": len(names),
        "early_modules": early,
        "held_out": {
            "samples": args.held_out,
            "noise_seed": HELD_OUT_SEED,
            "measure": "sliced_wasserstein reduction='reference' over all "
            "modules; steered source vs unsteered target, sample k "
            "of both on the same noise",
        },
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "notes": "independent = PipelineTarget(shared_noise=False), which gives the "
        "pre-CRN trainer's losses and maps bit for bit (checked against a run "
        "of the code before the change); train_s is wall time on a shared, "
        "loaded machine (not a benchmark of speed)",
        "runs": runs,
    }
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "diffusion-crn-cpu.json")
    write_json(out, {**environment(), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
