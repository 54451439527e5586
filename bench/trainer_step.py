"""Training-step time of ``lf.train`` against the reference-style trainer on one model, in one
run; writes bench/results/trainer-<device>.json.

    python bench/trainer_step.py [--layers 30] [--steps 3] [--sentences 32]     # CPU, SmolLM2-sized
    python bench/trainer_step.py --qwen 1.5B 7B                                 # GPU, bf16

Both trainers see the same 32 source and 32 target sentences and steer all post-attention
norms. On a GPU the step's model FLOP utilization is reported: lf.train's forward up to the last
loss module plus the activation-only backward count 4 · (parameters in the layers run) · tokens;
the reference's full forward and backward with weight gradients count 6 · parameters · tokens;
both against the device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write_json  # noqa: E402
from trainer_setup import (lineas_step_times, reference_trainer_step_times,  # noqa: E402
                           sentences, smollm2_sized, word_tokenizer)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}   # dense


def qwen_model(size: str):
    from generation_setup import QWEN25
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**QWEN25[size], max_position_embeddings=4096, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None

PATTERN = r"model\.layers\.\d+\.post_attention_layernorm"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--qwen", nargs="*", default=None, choices=["1.5B", "7B"],
                    help="GPU: Qwen2.5 configs with random weights in bf16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.qwen and not torch.cuda.is_available():
        print("trainer_step.py: --qwen needs a CUDA device; GPU numbers come only from a GPU run")
        return 2
    torch.manual_seed(0)
    tok = word_tokenizer()
    src, tgt = sentences(args.sentences, 1), sentences(args.sentences, 2)
    tokens = sum(len(s.split()) for s in src)
    if args.qwen:
        builds = [(f"Qwen2.5-{q} config, random weights, bf16", lambda q=q: qwen_model(q))
                  for q in args.qwen]
    else:
        builds = [(f"SmolLM2-135M-sized Llama, {args.layers} layers, random weights, fp32",
                   lambda: smollm2_sized(args.layers))]
    rows = []
    for label, build in builds:
        model = build()
        n_params = sum(p.numel() for p in model.parameters())
        ref = reference_trainer_step_times(model, tok, src, tgt, PATTERN, args.steps)
        del model
        ours = lineas_step_times(build(), tok, src, tgt, PATTERN, args.steps)
        row = {"model": label, "sentences": args.sentences, "modules": PATTERN,
               "threads": torch.get_num_threads(), "reference_step_s": ref, "lineas_step_s": ours,
               "reference_median_s": statistics.median(ref),
               "lineas_median_s": statistics.median(ours), "parameters": n_params}
        row["speedup"] = row["reference_median_s"] / row["lineas_median_s"]
        if args.qwen and peak_flops():
            peak = peak_flops()
            row["reference_mfu"] = 6 * n_params * tokens / row["reference_median_s"] / peak
            row["lineas_mfu"] = 4 * n_params * tokens / row["lineas_median_s"] / peak
        print(f"{label}: reference {row['reference_median_s']:.3f} s/step, lineas_fast "
              f"{row['lineas_median_s']:.3f} s/step, speedup {row['speedup']:.2f}x")
        rows.append(row)
        if args.qwen:
            torch.cuda.empty_cache()
    env = environment()
    name = "cpu" if not args.qwen else env["device"].replace(" ", "_")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"trainer-{name}.json")
    write_json(out, {**env, **rows[0], "runs": rows} if len(rows) == 1 else {**env, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
