"""Data-parallel training over 1, 2, ... processes: step time, scaling and the bytes each step
moves between ranks; writes bench/results/distributed-<device>.json.

    python bench/distributed.py                    # CPU (gloo): 1 and 2 processes
    python bench/distributed.py --procs 1 2 4      # more where there are cores (or GPUs: NCCL)

Each process count is one ``torchrun --standalone`` job running this file as its worker (one
thread per rank on the CPU). The job trains the same run (a Llama-shaped model of
``--hidden``/``--layers``, random weights, ``--batch`` sentences per step, maps on every
post-attention norm) for ``--steps`` steps after one warm-up step; rank 0 records the median
step time (records read every step, so each timed step has finished). The global batch is the
same for every process count (strong scaling): speedup = t(1) / t(N), efficiency = speedup / N.

Communication per step, computed from the shapes (not measured): the pooled activations are
gathered in one ``all_gather`` of N blocks of ⌈batch/N⌉ × Σd float32 (Σd over the loss
modules), and the map gradients summed in one ``all_reduce`` of 2·Σd float32 (ω and b); a ring
all-reduce sends and receives 2(N−1)/N of its buffer per rank. The checksum (every
``read_every`` steps) and the first step's reads of the target activations are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_check_args, checked, environment, write_json  # noqa: E402

PATTERN = r"model\.layers\.\d+\.post_attention_layernorm"


def sentences(n: int, seed: int, words: int = 24) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for _ in range(n):
        ks = torch.randint(2, 8, (words,), generator=g).tolist()
        out.append(" ".join("".join(letters[i] for i in torch.randint(0, 26, (k,), generator=g)) for k in ks))
    return out


def worker(args) -> None:
    """One rank of a job: train and (rank 0) write the step times to ``args.worker_out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tiny_models import tiny_tokenizer

    import lineas_fast as lf

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        model = model.to("cuda")
    tok = tiny_tokenizer()
    src, tgt = sentences(4 * args.batch, 1), sentences(4 * args.batch, 2)
    times = []
    with lf.Trainer(
        model, tok, src, tgt, PATTERN, steps=args.steps + 1, batch_size=args.batch, progress=False,
        optimizer="sgd", read_every=1, max_length=args.length,
    ) as run:  # fmt: skip
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            run.step()  # read_every=1: records read, the step has finished
            if i:
                times.append(time.perf_counter() - t0)
        world = 1 if run.ranks is None else run.ranks.world_size
        dims = [run.maps[m][0].numel() for m in run.names]
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.worker_out, "w") as f:
            json.dump({"world_size": world, "step_seconds": times, "map_dims": dims}, f)


def communication(world: int, batch: int, dims: list[int]) -> dict:
    """Bytes per step per rank for the gather and the gradient all-reduce (float32)."""
    share = -(-batch // world)
    gathered = world * share * sum(dims) * 4  # the all_gather's output buffer on each rank
    reduced = 2 * sum(dims) * 4
    return {
        "all_gather_output_bytes": gathered if world > 1 else 0,
        "all_gather_sent_bytes": (world - 1) * share * sum(dims) * 4,
        "all_reduce_buffer_bytes": reduced if world > 1 else 0,
        "all_reduce_ring_bytes_each_way": int(2 * (world - 1) / world * reduced),
    }


def main(argv=None) -> int | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=None)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    add_check_args(p)
    args = p.parse_args(argv)
    if args.worker_out:
        return worker(args)
    if min(args.procs) < 1 or min(args.hidden, args.layers, args.batch, args.length, args.steps) < 1:
        p.error("--procs, --hidden, --layers, --batch, --length and --steps must be positive")
    if args.check_args:
        return checked(
            "distributed.py",
            procs=args.procs,
            backend="nccl" if torch.cuda.is_available() else "gloo",
            launcher="python -m torch.distributed.run",
            settings={k: getattr(args, k) for k in ("hidden", "layers", "batch", "length", "steps")},
            out=args.out or "bench/results/distributed-<device>.json",
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.procs:
            out = os.path.join(tmp, f"w{n}.json")
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                __file__, "--worker-out", out, "--hidden", str(args.hidden), "--layers", str(args.layers),
                "--batch", str(args.batch), "--length", str(args.length), "--steps", str(args.steps),
            ]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
            subprocess.run(cmd, env=env, check=True, timeout=1800, capture_output=True)
            with open(out) as f:
                got = json.load(f)
            median = statistics.median(got["step_seconds"])
            rows.append(
                {
                    "processes": n,
                    "world_size": got["world_size"],
                    "median_step_seconds": median,
                    "step_seconds": got["step_seconds"],
                    **communication(n, args.batch, got["map_dims"]),
                }
            )
            print(f"{n} process(es): median step {median * 1e3:.1f} ms", flush=True)
    base = rows[0]["median_step_seconds"] if rows[0]["processes"] == 1 else None
    for r in rows:
        if base is not None:
            r["speedup"] = base / r["median_step_seconds"]
            r["efficiency"] = r["speedup"] / r["processes"]
    name = "cpu" if device == "cpu" else torch.cuda.get_device_name().replace(" ", "_")
    payload = {
        "benchmark": "distributed",
        "environment": environment(),
        "backend": "nccl" if device == "cuda" else "gloo",
        "threads_per_rank": 1 if device == "cpu" else None,
        # other work on the machine while it ran (1-, 5-, 15-minute load averages), read after
        "load_average": list(os.getloadavg()),
        "cores": os.cpu_count(),
        "settings": {k: getattr(args, k) for k in ("hidden", "layers", "batch", "length", "steps")},
        "rows": rows,
    }
    default = os.path.join(os.path.dirname(__file__), "results", f"distributed-{name}.json")
    write_json(args.out or default, payload)


if __name__ == "__main__":
    sys.exit(main())
