"""Host memory of ``lineas-fast train`` under ``torchrun`` (gloo, CPU): each rank's measured peak
next to the arithmetic of docs/distributed.md ("Memory arithmetic") for the same model; writes
bench/results/fsdp-memory-cpu.json.

    python bench/fsdp_memory.py                         # the default runs below, ~7 minutes
    python bench/fsdp_memory.py --runs fsdp-bf16 --layers 4 --out /tmp/m.json   # a quick look

The script writes a Llama-shaped model of ``--hidden``/``--intermediate``/``--layers`` (random
weights; 468M parameters by default, decoder layers 86% of them) to a temporary folder, saved in
bfloat16 and, for the ``fsdp-f32ckpt`` run, in float32, with the tests' character tokenizer, and
runs ``lineas-fast train`` on it with ``torchrun --standalone --nproc-per-node N`` (one thread per
rank), ``--steps`` steps of ``--batch`` sentences of ``--length`` tokens, maps on every
post-attention norm (the command's default ``--modules``). The runs (``--runs``, in order; a name
given twice runs twice, and by default the two ``fsdp-bf16`` runs are repeated at the end):

* ``fsdp-bf16``: the bfloat16 checkpoint, ``--fsdp --dtype bfloat16`` (what the docs assume);
* ``fsdp-bf16-mmap``: the same with ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment: glibc's
  malloc then gives every allocation of 1 MiB or more its own mapping, returned to the system when
  freed. With its default (a threshold that rises to the size of the blocks freed), memory of the
  layers FSDP all-gathers and frees again can stay in the process: a rank's resident set grew by
  about one unsharded layer per layer in the first forward (seen in a trace of FSDP's unshard and
  reshard calls with the RSS at each), by an amount that varies between runs;
* ``fsdp-f32``: the bfloat16 checkpoint, ``--fsdp --dtype float32``: how the command loaded every
  model before ``--dtype`` existed (issue #29's probe: "twice the host memory that
  docs/distributed.md computes");
* ``fsdp-f32ckpt``: the float32 checkpoint, ``--fsdp`` without ``--dtype`` (auto: float32);
* ``dp-bf16``: the bfloat16 checkpoint without ``--fsdp`` (data parallel: every rank loads it).

**What is measured, and how.** Each rank is this file in worker mode, which runs the command
in-process (``lineas_fast.cli.main``, what the ``lineas-fast`` script calls) and reads its own
``/proc/self/status``: ``VmHWM``, the kernel's record of the process's peak resident set (anonymous
memory, file pages mapped in such as the safetensors file and the shared libraries, and shared
memory; the kernel counts it, nothing is sampled, so no short peak is missed). The peak is read and
then reset (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0) at the boundaries of four phases, so
each phase's peak is its own: ``start`` (interpreter, imports, the process group: everything before
the model), ``load`` (``load_model_or_pipeline``: rank 0 reads the weights; under ``--fsdp`` the
other ranks build the model on the meta device), ``shard`` (``shard_model``: ``fully_shard`` and the
weights broadcast from rank 0; ``--fsdp`` only), ``train`` (the reads of the target activations,
the steps, the steering written). A rank's peak is the largest of its phases' peaks. Where the reset
is refused, each phase reports the peak so far (``phase_peaks_cumulative`` true in the file). The
current ``VmRSS``, ``RssAnon`` and ``RssFile`` at each boundary are recorded too. Only the worker
processes are measured (not the torchrun agent). Sizes are in GB (10⁹ bytes), as in the docs.

**The arithmetic** (``arithmetic()``) is the docs' estimate applied to this model, world size,
dtype and batch: weights ``W = parameters × bytes`` (2 for bfloat16, 4 for float32); one decoder
layer ``L``; activations kept for the backward ``A = 34·d bytes per token per layer`` at 2 bytes per
value (the docs' bf16 figure; × 2 in float32) over every layer up to the last steered one, for this
rank's share of the batch; maps, gradients and Adam's moments ``24·d`` bytes per steered layer. Per
rank under FSDP, training: ``W/N + 2L + A + maps``; data parallel: ``W + A + maps``; and under
``--fsdp`` the CLI's rank 0 reads the whole model (``W``). The predicted peak of a rank is its
measured ``start`` RSS (the process before any model) plus the largest of those terms for it. The
file also records a term the formula leaves out, the root's own parameters (embeddings, final norm,
LM head), which FSDP2 keeps unsharded from the root's forward to the end of its backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_check_args, checked, environment, write_json  # noqa: E402

GB = 1e9
# glibc's malloc: a fixed threshold above which every allocation is its own mmap, unmapped when freed
MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
RUNS = {  # name: (checkpoint dtype, --dtype given or None, --fsdp, environment added)
    "fsdp-bf16": ("bfloat16", "bfloat16", True, {}),
    "fsdp-bf16-mmap": ("bfloat16", "bfloat16", True, MMAP_THRESHOLD),
    "fsdp-f32": ("bfloat16", "float32", True, {}),
    "fsdp-f32ckpt": ("float32", None, True, {}),
    "dp-bf16": ("bfloat16", "bfloat16", False, {}),
}
BYTES = {"bfloat16": 2, "float32": 4}
PHASES = ("start", "load", "shard", "train")
# docs/distributed.md's constants
ACT_BYTES_PER_TOKEN_LAYER_PER_D = 34  # at 2 bytes per value (bf16)
MAP_BYTES_PER_LAYER_PER_D = 24  # float32 ω, b, their gradients and Adam's two moments
UNSHARDED_LAYERS = 2  # the one running and the one prefetched


# --- worker: one rank ------------------------------------------------------------------------------
def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024  # kB -> bytes
    return out


class Phases:
    """Per-phase peak resident set of this process (VmHWM, reset between phases)."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.resettable = True

    def end(self, phase: str) -> None:
        now = _status()
        after = {f"{k}_after_bytes": v for k, v in now.items() if k != "VmHWM"}
        self.rows[phase] = {"peak_bytes": now["VmHWM"], **after}
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.resettable = False


def worker(out_prefix: str, argv: list[str]) -> int:
    """Run ``lineas-fast`` with ``argv`` in this process, its phases' peaks to OUT_PREFIX.rankR.json."""
    phases = Phases()
    import lineas_fast.cli.train as cli_train
    import lineas_fast.training.trainer as trainer
    from lineas_fast.cli import main

    load, shard = cli_train.load_model_or_pipeline, trainer.shard_model

    def timed_load(*a, **k):
        phases.end("start")
        got = load(*a, **k)
        phases.end("load")
        return got

    def timed_shard(*a, **k):
        shard(*a, **k)
        phases.end("shard")

    cli_train.load_model_or_pipeline, trainer.shard_model = timed_load, timed_shard
    t0 = time.perf_counter()
    status = main(argv)
    phases.end("train")
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out_prefix}.rank{rank}.json", "w") as f:
        json.dump(
            {
                "rank": rank,
                "exit_status": status,
                "seconds": time.perf_counter() - t0,
                "phase_peaks_cumulative": not phases.resettable,
                "phases": phases.rows,
            },
            f,
        )
    return status


# --- the model and the arithmetic -------------------------------------------------------------------
def model_config(args):
    from transformers import LlamaConfig

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tiny_models import COMMON

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(128, args.length),
        tie_word_embeddings=False,
        pad_token_id=COMMON["pad_token_id"],
        eos_token_id=COMMON["eos_token_id"],
        bos_token_id=COMMON["bos_token_id"],
    )


def parameter_counts(config) -> dict:
    """Parameters of the whole model and of one decoder layer (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    layers = layer * config.num_hidden_layers
    return {"total": total, "per_layer": layer, "decoder_layers": layers, "root": total - layers}


def arithmetic(
    counts: dict, d: int, layers: int, dtype: str, world: int, batch: int, length: int, fsdp: bool
) -> dict:
    """docs/distributed.md's estimate for each rank (bytes), without the process itself."""
    b = BYTES[dtype]
    weights = counts["total"] * b
    layer = counts["per_layer"] * b
    tokens = -(-batch // world) * length  # the largest share of the batch, every sentence full
    acts = ACT_BYTES_PER_TOKEN_LAYER_PER_D * d * (b / 2) * tokens * layers
    maps = MAP_BYTES_PER_LAYER_PER_D * d * layers
    terms = {"weights_W": weights, "one_layer_L": layer, "activations_A_per_rank": acts, "maps": maps}
    # not in the docs' formula: FSDP2 keeps the root's own parameters (embeddings, final norm, LM
    # head) unsharded from the root's forward to the end of its backward
    terms["root_unsharded_not_in_formula"] = counts["root"] * b
    if fsdp:
        training = weights / world + UNSHARDED_LAYERS * layer + acts + maps
        formula = "training: W/N + 2L + A + maps; rank 0 also reads the whole model: W"
        ranks = [max(weights, training) if r == 0 else training for r in range(world)]
    else:
        training = weights + acts + maps
        formula = "every rank: W + A + maps"
        ranks = [training] * world
    return {"formula": formula, "terms_bytes": terms, "training_bytes": training, "per_rank_bytes": ranks}


def sentences(n: int, seed: int, words: int = 24) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        " ".join("".join(letters[i] for i in torch.randint(0, 26, (5,), generator=g)) for _ in range(words))
        for _ in range(n)
    ]


def write_models(config, folder: str, dtypes: set[str]) -> None:
    """The random-weight model saved once per dtype in DTYPES (folder/<dtype>), with the tokenizer."""
    from tiny_models import tiny_tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for dtype in sorted(dtypes, key=lambda x: BYTES[x], reverse=True):  # float32 first, then convert
        model = model.to(getattr(torch, dtype))
        path = os.path.join(folder, dtype)
        model.save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    del model


def run_job(name: str, repeat: int, args, folder: str, tmp: str) -> list[dict]:
    ckpt, dtype, fsdp, extra = RUNS[name]
    prefix = os.path.join(tmp, f"{name}.{repeat}")
    flags = [
        "train", "--model", os.path.join(folder, ckpt), "--source", os.path.join(tmp, "src.txt"),
        "--target", os.path.join(tmp, "tgt.txt"), "--steps", str(args.steps), "--batch-size", str(args.batch),
        "--max-length", str(args.length), "--out", prefix + ".safetensors",
    ]  # fmt: skip
    if dtype:
        flags += ["--dtype", dtype]
    if fsdp:
        flags.append("--fsdp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.procs}",
        os.path.abspath(__file__), "--worker", prefix, *flags,
    ]  # fmt: skip
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode:
        raise SystemExit(f"{name}: torchrun exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    ranks = []
    for r in range(args.procs):
        with open(f"{prefix}.rank{r}.json") as f:
            ranks.append(json.load(f))
    peaks = ", ".join(f"{max(p['peak_bytes'] for p in r['phases'].values()) / GB:.2f}" for r in ranks)
    print(f"{name} ({repeat}): {time.perf_counter() - t0:.0f} s, peak per rank (GB): {peaks}", flush=True)
    return ranks


def main(argv=None) -> int | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--runs",
        nargs="+",
        choices=list(RUNS),
        default=[*RUNS, "fsdp-bf16", "fsdp-bf16-mmap"],
        help="runs, in order; a name given twice is run twice (default: every run, then the two "
        "fsdp-bf16 runs again: the default allocator's part varies between runs)",
    )
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per torchrun job")
    p.add_argument("--out", default=None)
    add_check_args(p)
    args = p.parse_args(argv)
    sizes = ("procs", "hidden", "intermediate", "layers", "heads", "vocab", "batch", "length", "steps")
    if min(getattr(args, k) for k in sizes) < 1 or args.procs < 2 or args.batch < args.procs:
        p.error("sizes must be positive, --procs at least 2 and --batch at least --procs")
    config = model_config(args)
    counts = parameter_counts(config)
    settings = {k: getattr(args, k) for k in sizes}
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "fsdp-memory-cpu.json")
    if args.check_args:
        return checked("fsdp_memory.py", runs=args.runs, parameters=counts, settings=settings, out=out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "src.txt"), "w") as f:
            f.write("\n".join(sentences(2 * args.batch, 1)) + "\n")
        with open(os.path.join(tmp, "tgt.txt"), "w") as f:
            f.write("\n".join(sentences(2 * args.batch, 2)) + "\n")
        folder = os.path.join(tmp, "models")
        write_models(config, folder, {RUNS[name][0] for name in args.runs})
        for i, name in enumerate(args.runs):
            ckpt, dtype, fsdp, extra = RUNS[name]
            loaded = dtype or ckpt  # auto: the checkpoint's own
            repeat = args.runs[:i].count(name)
            ranks = run_job(name, repeat, args, folder, tmp)
            pred = arithmetic(
                counts, args.hidden, args.layers, loaded, args.procs, args.batch, args.length, fsdp
            )
            for r, got in enumerate(ranks):
                got["peak_bytes"] = max(p["peak_bytes"] for p in got["phases"].values())
                got["process_before_model_bytes"] = got["phases"]["start"]["VmRSS_after_bytes"]
                got["predicted_bytes"] = got["process_before_model_bytes"] + pred["per_rank_bytes"][r]
                got["measured_over_predicted"] = got["peak_bytes"] / got["predicted_bytes"]
            rows.append(
                {
                    "run": name,
                    "repeat": repeat,
                    "checkpoint_dtype": ckpt,
                    "dtype_flag": dtype,
                    "loaded_dtype": loaded,
                    "fsdp": fsdp,
                    "environment_added": extra,
                    "arithmetic": pred,
                    "ranks": ranks,
                }
            )
    payload = {
        "benchmark": "fsdp_memory",
        "environment": environment(),
        "backend": "gloo",
        "threads_per_rank": 1,
        "measured": "each worker's /proc/self/status VmHWM (peak resident set), reset between phases "
        "with /proc/self/clear_refs; host memory, CPU",
        "load_average": list(os.getloadavg()),
        "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "model": {"family": "llama", "config": config.to_diff_dict(), "parameters": counts},
        "settings": settings,
        "constants": {
            "activation_bytes_per_token_per_layer_per_d_bf16": ACT_BYTES_PER_TOKEN_LAYER_PER_D,
            "map_bytes_per_layer_per_d": MAP_BYTES_PER_LAYER_PER_D,
            "unsharded_layers": UNSHARDED_LAYERS,
        },
        "rows": rows,
    }
    write_json(out, payload)


if __name__ == "__main__":
    sys.exit(main())
