"""Training-step time of ``lf.train`` against the reference-style trainer on one model, in one
run; writes bench/results/trainer-<device>.json.

    python bench/trainer_step.py                       # CPU: real SmolLM2-135M + demo data, and synthetic
    python bench/trainer_step.py --workload real --rounds 6 --ablation
    python bench/trainer_step.py --qwen 1.5B 7B        # GPU, bf16, synthetic sentences
    python bench/trainer_step.py --qwen 1.5B --check-args   # the run it would be; no GPU needed

Workloads (``--workload``, default both on CPU):

* ``real``: SmolLM2-135M-Instruct in float32 and the demo's own 32 insults → 32 non-insults
  (``trainer_setup.demo_sentences``), all 30 post-attention norms.
* ``synthetic``: a SmolLM2-135M-sized Llama with random weights and 32 + 32 synthetic
  sentences of 6–48 words.

How it times: ``--rounds`` rounds; in each, every trainer runs ``--steps`` + 1 steps on the same
model, the first dropped, each remaining step timed on its own; the trainers alternate their
order from round to round (reference, lineas_fast, then lineas_fast, reference, ...) so that
load from other processes falls on both. Reported: per-step medians over all timed steps, and
the speedup as the ratio of the medians, with the per-round ratios beside it, and the same
ratio of process CPU seconds (less sensitive to other processes on a shared machine; run with
``OMP_WAIT_POLICY=PASSIVE`` so idle worker threads sleep rather than spin). The load average
after each round is recorded. ``--ablation`` adds lf.train without packing (length buckets with
an attention mask).

Both trainers see the same source and target sentences and steer all post-attention norms. On a
GPU the step's model FLOP utilization is reported: lf.train's forward up to the last loss module
plus the activation-only backward count 4 · (parameters in the layers run) · tokens; the
reference's full forward and backward with weight gradients count 6 · parameters · tokens; both
against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_check_args, checked, environment, meta_parameters, write_json  # noqa: E402
from trainer_setup import (
    demo_sentences,
    lineas_step_times,  # noqa: E402
    reference_trainer_step_times,
    sentences,
    smollm2_real,
    smollm2_sized,
    word_tokenizer,
)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense
PATTERN = r"model\.layers\.\d+\.post_attention_layernorm"


def qwen_config(size: str):
    from generation_setup import QWEN25
    from transformers import Qwen2Config

    return Qwen2Config(**QWEN25[size], max_position_embeddings=4096, pad_token_id=0, eos_token_id=1)


def qwen_model(size: str):
    from transformers import Qwen2ForCausalLM

    cfg = qwen_config(size)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def providers(ablation: bool) -> dict:
    """name -> fn(model, tok, src, tgt, steps, cpu) returning ``steps`` per-step wall seconds
    and appending their process CPU seconds to ``cpu`` (the first step of each call run and
    dropped)."""

    def reference(m, t, s, g, k, cpu):
        c = []
        wall = reference_trainer_step_times(m, t, s, g, PATTERN, k + 1, cpu_times=c)
        cpu += c[1:]
        return wall[1:]

    out = {
        "reference": reference,
        "lineas_fast": lambda m, t, s, g, k, cpu: lineas_step_times(m, t, s, g, PATTERN, k, cpu_times=cpu),
    }
    if ablation:
        out["lineas_fast_bucketed"] = lambda m, t, s, g, k, cpu: lineas_step_times(
            m, t, s, g, PATTERN, k, packing=False, cpu_times=cpu
        )
    return out


def interleaved(model, tok, src, tgt, rounds: int, steps: int, ablation: bool) -> dict:
    """Per-provider lists of per-step seconds and per-round medians, the providers' order
    reversed every other round."""
    fns = providers(ablation)
    names = list(fns)
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    per_round = {n: [] for n in names}
    loads = []
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            ts = fns[n](model, tok, src, tgt, steps, cpu[n])
            times[n] += ts
            per_round[n].append(statistics.median(ts))
            print(
                f"  round {r} {n}: "
                + " ".join(f"{t:.3f}" for t in ts)
                + " s (cpu "
                + " ".join(f"{t:.2f}" for t in cpu[n][-len(ts) :])
                + ")",
                flush=True,
            )
        loads.append(load_average())
    return {"step_s": times, "step_cpu_s": cpu, "round_median_s": per_round, "load_average_1_5_15": loads}


def cpu_row(label: str, model, tok, src, tgt, args) -> dict:
    res = interleaved(model, tok, src, tgt, args.rounds, args.steps, args.ablation)
    med = {n: statistics.median(v) for n, v in res["step_s"].items()}
    rounds = res["round_median_s"]
    row = {
        "model": label,
        "sentences": len(src),
        "source_tokens": sum(len(x) for x in tok(src)["input_ids"]),
        "modules": PATTERN,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "timed_steps_per_round": args.steps,
        "reference_step_s": res["step_s"]["reference"],
        "lineas_step_s": res["step_s"]["lineas_fast"],
        "reference_median_s": med["reference"],
        "lineas_median_s": med["lineas_fast"],
        "speedup": med["reference"] / med["lineas_fast"],
        "speedup_per_round": [a / b for a, b in zip(rounds["reference"], rounds["lineas_fast"])],
        "reference_step_cpu_s": res["step_cpu_s"]["reference"],
        "lineas_step_cpu_s": res["step_cpu_s"]["lineas_fast"],
        "speedup_cpu_time": (
            statistics.median(res["step_cpu_s"]["reference"])
            / statistics.median(res["step_cpu_s"]["lineas_fast"])
        ),
        "load_average_1_5_15": res["load_average_1_5_15"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if args.ablation:
        row["lineas_bucketed_step_s"] = res["step_s"]["lineas_fast_bucketed"]
        row["lineas_bucketed_median_s"] = med["lineas_fast_bucketed"]
        row["speedup_bucketed"] = med["reference"] / med["lineas_fast_bucketed"]
        row["speedup_bucketed_cpu_time"] = statistics.median(
            res["step_cpu_s"]["reference"]
        ) / statistics.median(res["step_cpu_s"]["lineas_fast_bucketed"])
    print(
        f"{label}: reference {row['reference_median_s']:.3f} s/step, lineas_fast "
        f"{row['lineas_median_s']:.3f} s/step, speedup {row['speedup']:.2f}x (per round "
        + ", ".join(f"{x:.2f}" for x in row["speedup_per_round"])
        + f"; by process CPU time {row['speedup_cpu_time']:.2f}x)",
        flush=True,
    )
    return row


def gpu_rows(args, save=None) -> list[dict]:
    """One row per ``--qwen`` size; ``save(rows)`` after each (a run cut short keeps its rows)."""
    tok = word_tokenizer()
    src, tgt = sentences(args.sentences, 1), sentences(args.sentences, 2)
    tokens = sum(len(s.split()) for s in src)
    rows = []
    for q in args.qwen:
        label = f"Qwen2.5-{q} config, random weights, bf16"
        model = qwen_model(q)
        n_params = sum(p.numel() for p in model.parameters())
        ref = reference_trainer_step_times(model, tok, src, tgt, PATTERN, args.steps + 1)[1:]
        ours = lineas_step_times(model, tok, src, tgt, PATTERN, args.steps)
        row = {
            "model": label,
            "sentences": args.sentences,
            "modules": PATTERN,
            "reference_step_s": ref,
            "lineas_step_s": ours,
            "reference_median_s": statistics.median(ref),
            "lineas_median_s": statistics.median(ours),
            "parameters": n_params,
        }
        row["speedup"] = row["reference_median_s"] / row["lineas_median_s"]
        peak = peak_flops()
        if peak:
            row["reference_mfu"] = 6 * n_params * tokens / row["reference_median_s"] / peak
            row["lineas_mfu"] = 4 * n_params * tokens / row["lineas_median_s"] / peak
        print(
            f"{label}: reference {row['reference_median_s']:.3f} s/step, lineas_fast "
            f"{row['lineas_median_s']:.3f} s/step, speedup {row['speedup']:.2f}x"
        )
        rows.append(row)
        if save is not None:
            save(rows)
        del model
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", nargs="+", default=["real", "synthetic"], choices=["real", "synthetic"])
    ap.add_argument("--layers", type=int, default=30, help="synthetic model's layers")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per trainer and round")
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablation", action="store_true", help="also lf.train without packing")
    ap.add_argument(
        "--qwen",
        nargs="*",
        default=None,
        choices=["1.5B", "7B"],
        help="GPU: Qwen2.5 configs with random weights in bf16",
    )
    ap.add_argument("--out", default=None)
    add_check_args(ap)
    args = ap.parse_args(argv)
    if args.check_args:
        if args.qwen:
            return checked(
                "trainer_step.py",
                qwen=args.qwen,
                parameters={q: meta_parameters(qwen_config(q)) for q in args.qwen},
                sentences=args.sentences,
                timed_steps=args.steps,
                modules=PATTERN,
                peak_bf16_tflops=PEAK_BF16_TFLOPS,
                out=args.out or "bench/results/trainer-<device>.json",
            )
        return checked(
            "trainer_step.py",
            workload=args.workload,
            rounds=args.rounds,
            timed_steps=args.steps,
            out=args.out or "bench/results/trainer-cpu.json",
        )
    if args.qwen and not torch.cuda.is_available():
        print("trainer_step.py: --qwen needs a CUDA device; GPU numbers come only from a GPU run")
        return 2
    env = environment()
    name = "cpu" if not args.qwen else env["device"].replace(" ", "_")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"trainer-{name}.json")
    if args.qwen:
        rows = gpu_rows(args, save=lambda rows: write_json(out, {**env, "runs": rows}))
    else:
        torch.set_num_threads(args.threads)
        rows = []
        for w in args.workload:
            if w == "real":
                model, tok = smollm2_real()
                src, tgt = demo_sentences(args.sentences)
                label = "SmolLM2-135M-Instruct (real weights), demo insults -> non-insults, fp32"
            else:
                model, tok = smollm2_sized(args.layers), word_tokenizer()
                src, tgt = sentences(args.sentences, 1), sentences(args.sentences, 2)
                label = (
                    f"SmolLM2-135M-sized Llama, {args.layers} layers, random weights, "
                    f"synthetic sentences, fp32"
                )
            row = cpu_row(label, model, tok, src, tgt, args)
            row["workload"] = w
            rows.append(row)
            del model
    summary = {f"speedup_{r['workload']}": r["speedup"] for r in rows if "workload" in r}
    env["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    write_json(out, {**env, **summary, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
