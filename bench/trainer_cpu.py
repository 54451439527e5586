"""Training-step time of ``lf.train`` against the reference-style trainer on one model, in one
run; writes bench/results/trainer-<device>.json.

    python bench/trainer_cpu.py [--layers 30] [--steps 3] [--sentences 32]

On CPU it uses the SmolLM2-135M-sized Llama (random weights). Both trainers see the same 32
source and 32 target sentences and steer all post-attention norms.
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

PATTERN = r"model\.layers\.\d+\.post_attention_layernorm"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = word_tokenizer()
    src, tgt = sentences(args.sentences, 1), sentences(args.sentences, 2)
    ref = reference_trainer_step_times(smollm2_sized(args.layers), tok, src, tgt, PATTERN,
                                       args.steps)
    ours = lineas_step_times(smollm2_sized(args.layers), tok, src, tgt, PATTERN, args.steps)
    row = {"model": f"SmolLM2-135M-sized Llama, {args.layers} layers, random weights, fp32",
           "sentences": args.sentences, "modules": PATTERN, "threads": torch.get_num_threads(),
           "reference_step_s": ref, "lineas_step_s": ours,
           "reference_median_s": statistics.median(ref), "lineas_median_s": statistics.median(ours)}
    row["speedup"] = row["reference_median_s"] / row["lineas_median_s"]
    print(f"reference {row['reference_median_s']:.3f} s/step, lineas_fast "
          f"{row['lineas_median_s']:.3f} s/step, speedup {row['speedup']:.2f}x")
    env = environment()
    name = "cpu" if not torch.cuda.is_available() else env["device"].replace(" ", "_")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"trainer-{name}.json")
    write_json(out, {**env, **row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
