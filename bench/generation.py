"""Generation throughput per steering provider (unsteered, reference hooks, lineas_fast hooks,
DSAS-gated hooks, in-memory fused norms, folded); writes bench/results/generation-<device>.json.
A thin caller of ``lineas_fast.serve.bench.measure`` (what ``lineas-fast bench`` runs on a user's own
model and steering) on a SmolLM2-sized model with a random steering, plus two providers of this
repo's own (reference hooks, DSAS gates) and the ATen operator count per forward.

    python bench/generation.py                     # CPU: SmolLM2-135M-sized Llama, fp32
    python bench/generation.py --qwen 1.5B 7B      # GPU: Qwen2.5 configs, random weights, bf16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write_json  # noqa: E402
from generation_setup import QWEN25, extra_providers, ops_per_forward, random_steering  # noqa: E402

from lineas_fast.serve.bench import measure, table  # noqa: E402


def models(args):
    if args.qwen:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        for size in args.qwen:
            cfg = Qwen2Config(**QWEN25[size], max_position_embeddings=4096)
            with torch.device("cuda"):
                torch.manual_seed(0)
                m = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
            yield f"Qwen2.5-{size} config, random weights, bf16", m
    else:
        from trainer_setup import smollm2_sized

        yield "SmolLM2-135M-sized Llama, random weights, fp32", smollm2_sized()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qwen", nargs="*", choices=sorted(QWEN25), default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gpu = bool(args.qwen)
    if gpu and not torch.cuda.is_available():
        print("generation.py: --qwen needs a CUDA device; GPU numbers come only from a GPU run")
        return 2
    batches = args.batch or ([1, 16, 64] if gpu else [1, 8])
    prompt_len = args.prompt_len or (512 if gpu else 64)
    new_tokens = args.new_tokens or (64 if gpu else 16)
    env = environment()
    name = env["device"].replace(" ", "_") if gpu else "cpu"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"generation-{name}.json")
    rows = []
    for label, model in models(args):
        steering = random_steering(model)
        got, skipped = measure(
            model,
            steering,
            1.0,
            batches,
            prompt_len,
            new_tokens,
            repeats=args.repeats,
            extra=extra_providers(model, steering),
            annotate=lambda run: {"aten_ops_per_forward": ops_per_forward(run)},
        )
        for provider, why in skipped.items():
            print(f"{label}: {provider} skipped: {why}")
        rows += [{"model": label, **r} for r in got]
        print(table(got))
        del model  # after each model: a run cut short keeps its rows
        write_json(out, {**env, "threads": torch.get_num_threads(), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
