"""Generation throughput per steering provider (unsteered, reference hooks, lineas_fast hooks,
DSAS-gated hooks, in-memory fused norms, folded); writes bench/results/generation-<device>.json.
A thin caller of ``lineas_fast.serve.bench.measure`` (what ``lineas-fast bench`` runs on a user's own
model and steering) on a SmolLM2-sized model with a random steering, plus two providers of this
repo's own (reference hooks, DSAS gates) and the ATen operator count per forward.

    python bench/generation.py                     # CPU: SmolLM2-135M-sized Llama, fp32
    python bench/generation.py --qwen 1.5B 7B      # GPU: Qwen2.5 configs, random weights, bf16
    python bench/generation.py --qwen 1.5B --providers unsteered folded fused_norms --batch 1 16
    python bench/generation.py --qwen 1.5B --check-args   # the run it would be; no GPU needed

Providers run in the order given (``--providers``; default: all, ``measure``'s own then this repo's
two), each timed over every batch; the result file is written after each provider, so a run cut
short keeps the providers it finished (ratios against the unsteered rows of the same model).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_check_args, checked, environment, meta_parameters, write_json  # noqa: E402
from generation_setup import QWEN25, extra_providers, ops_per_forward, random_steering  # noqa: E402

from lineas_fast.serve.bench import PROVIDERS, add_overheads, measure, table  # noqa: E402

EXTRA = ("reference_hooks", "lineas_gated")  # this repo's own (generation_setup.extra_providers)
ALL_PROVIDERS = [*PROVIDERS, *EXTRA]


def qwen_config(size: str):
    from transformers import Qwen2Config

    return Qwen2Config(**QWEN25[size], max_position_embeddings=4096)


def models(args):
    if args.qwen:
        from transformers import Qwen2ForCausalLM

        for size in args.qwen:
            cfg = qwen_config(size)
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
    ap.add_argument(
        "--providers",
        nargs="+",
        choices=ALL_PROVIDERS,
        default=ALL_PROVIDERS,
        metavar="PROVIDER",
        help="timed in this order (default: " + " ".join(ALL_PROVIDERS) + ")",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    ap.add_argument("--out", default=None)
    add_check_args(ap)
    args = ap.parse_args(argv)
    gpu = bool(args.qwen)
    batches = args.batch or ([1, 16, 64] if gpu else [1, 8])
    prompt_len = args.prompt_len or (512 if gpu else 64)
    new_tokens = args.new_tokens or (64 if gpu else 16)
    if min(batches) < 1 or prompt_len < 1 or new_tokens < 1 or args.repeats < 1:
        ap.error("--batch, --prompt-len, --new-tokens and --repeats must be positive")
    if args.check_args:
        return checked(
            "generation.py",
            models={f"Qwen2.5-{q}": meta_parameters(qwen_config(q)) for q in args.qwen}
            if gpu
            else "SmolLM2-135M-sized Llama, fp32",
            providers=args.providers,
            batches=batches,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            repeats=args.repeats,
            out=args.out or f"bench/results/generation-{'<device>' if gpu else 'cpu'}.json",
        )
    if gpu and not torch.cuda.is_available():
        print("generation.py: --qwen needs a CUDA device; GPU numbers come only from a GPU run")
        return 2
    env = environment()
    name = env["device"].replace(" ", "_") if gpu else "cpu"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"generation-{name}.json")
    rows = []
    for label, model in models(args):
        steering = random_steering(model)
        extra = extra_providers(model, steering)
        done = []  # this model's rows
        for provider in args.providers:
            got, skipped = measure(
                model,
                steering,
                1.0,
                batches,
                prompt_len,
                new_tokens,
                repeats=args.repeats,
                providers=() if provider in EXTRA else (provider,),
                extra={provider: extra[provider]} if provider in EXTRA else None,
                annotate=lambda run: {"aten_ops_per_forward": ops_per_forward(run)},
            )
            for p, why in skipped.items():
                print(f"{label}: {p} skipped: {why}")
            done = add_overheads(done + [{"model": label, **r} for r in got])
            # after each provider: a run cut short keeps the providers it finished
            write_json(out, {**env, "threads": torch.get_num_threads(), "results": rows + done})
        print(table(done))
        rows += done
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
