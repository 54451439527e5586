"""The Triton kernels against the PyTorch path over a whole training run, on a small
real-shaped model (Liger-Kernel's convergence check); writes
bench/results/convergence-<device>.json and exits 1 when the runs differ beyond the tolerances.

    python bench/convergence.py                       # CUDA: Qwen2.5-0.5B shape, fp32 and bf16
    TRITON_INTERPRET=1 python bench/convergence.py --tiny --out /tmp/c.json   # any machine

Each comparison trains twice from the same starting point (same model, sentences, seed and
minibatches): ``lf.train(..., backend="triton")`` and ``backend="torch"``, ``--steps`` Adam steps
on every post-attention norm. The model is Qwen2.5-0.5B-shaped (24 layers, d = 896) with random
weights, in fp32 (TF32 off, so both runs share the matmuls' numerics) and in bf16 (maps and loss
in fp32); ``--tiny`` is the tests' 3-layer Llama in fp32. Recorded per step: both losses and
their relative difference; per map parameter: how far it moved and the largest difference
between the runs relative to that move.

Tolerances. fp32: the runs differ only in rounding order (fused multiply-adds, reduction
order): each step's loss within 1e-4 relative, and every map parameter tensor's move within
1e-3 of its largest entry, element by element. bf16: the steered activations are rounded to
bf16 in both paths, sometimes one ulp apart, so the gradients differ by ~1e-2 relative; Adam
turns a coordinate's noisy small gradient into a full ±lr step, so element-wise moves are not
comparable and the check is on the whole: each step's loss within 2e-2 relative, and
‖Δ_triton − Δ_torch‖₂ ≤ 0.2 ‖Δ_torch‖₂ over all ω and over all b (Δ: final − initial). A wiring
error (a map on the wrong axis, a missing gradient, a wrong layer's loss) changes the first
step's update or the loss by far more.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_check_args, checked, environment, meta_parameters, write_json  # noqa: E402

PATTERN = r"model\.layers\.\d+\.post_attention_layernorm"
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
TOLERANCES = {"fp32": {"loss": 1e-4, "moves": 1e-3}, "bf16": {"loss": 2e-2, "moves_l2": 0.2}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def qwen_05b_config():
    from transformers import Qwen2Config

    return Qwen2Config(**QWEN25_05B, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1)


def qwen_05b(dtype: torch.dtype, device: str):
    from transformers import Qwen2ForCausalLM

    cfg = qwen_05b_config()
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(cfg).to(dtype).eval()


def train(
    model, tok, source, target, backend: str, steps: int, lr: float, batch_size: int, pattern: str = PATTERN
):
    """(steering, per-step losses) of one run."""
    import lineas_fast as lf

    hist = []
    st = lf.train(
        model,
        tok,
        source,
        target,
        modules=pattern,
        steps=steps,
        batch_size=batch_size,
        optimizer="adam",
        lr=lr,
        seed=1,
        backend=backend,
        progress=False,
        callback=hist.append,
    )
    return st, [r.loss for r in hist]


def run_differences(st, loss, st_ref, loss_ref) -> dict:
    """How a run (steering ``st``, per-step ``loss``) differs from a reference run: each step's
    relative loss difference and its largest; per map parameter (ω, b of each module) the
    reference's move from the identity and the largest element difference, and the largest
    ratio of the two; over all modules, ‖Δ − Δ_ref‖₂ / ‖Δ_ref‖₂ for ω and for b."""
    rel = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(loss, loss_ref)]
    moves, l2 = [], {}
    for i, what in enumerate(("omega", "bias")):
        start = 1.0 if what == "omega" else 0.0
        d_ref = torch.cat([st_ref[n][i].double().cpu() - start for n in st_ref.modules])
        d_run = torch.cat([st[n][i].double().cpu() - start for n in st_ref.modules])
        l2[what] = ((d_run - d_ref).norm() / d_ref.norm()).item()
        for name in st_ref.modules:
            moved = (st_ref[name][i].double().cpu() - start).abs().max().item()
            diff = (st[name][i].double().cpu() - st_ref[name][i].double().cpu()).abs().max().item()
            moves.append(
                {
                    "module": name,
                    "param": what,
                    "moved": moved,
                    "diff": diff,
                    "relative": diff / moved if moved > 0 else float("inf"),
                }
            )
    return {
        "loss_relative_diff": rel,
        "max_loss_relative_diff": max(rel),
        "max_move_relative_diff": max(m["relative"] for m in moves),
        "moves_relative_l2": l2,
        "moves": moves,
    }


def compare(
    model,
    tok,
    source,
    target,
    steps: int = 30,
    lr: float = 3e-3,
    batch_size: int = 16,
    pattern: str = PATTERN,
) -> dict:
    """Both runs on ``model`` (the PyTorch path is the reference) and ``run_differences``."""
    st_torch, loss_torch = train(model, tok, source, target, "torch", steps, lr, batch_size, pattern)
    st_triton, loss_triton = train(model, tok, source, target, "triton", steps, lr, batch_size, pattern)
    return {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "modules": pattern,
        "loss_torch": loss_torch,
        "loss_triton": loss_triton,
        **run_differences(st_triton, loss_triton, st_torch, loss_torch),
    }


def verdict(row: dict, dtype: str) -> list[str]:
    """What exceeds the tolerances of ``dtype`` (empty: the runs agree)."""
    tol, out = TOLERANCES[dtype], []
    if row["max_loss_relative_diff"] > tol["loss"]:
        out.append(
            f"{dtype}: loss curves differ by {row['max_loss_relative_diff']:.2e} "
            f"relative (tolerance {tol['loss']:.0e})"
        )
    if "moves" in tol and row["max_move_relative_diff"] > tol["moves"]:
        out.append(
            f"{dtype}: a map parameter's move differs by "
            f"{row['max_move_relative_diff']:.2e} of the move (tolerance "
            f"{tol['moves']:.0e})"
        )
    for what, rel in row["moves_relative_l2"].items():
        if "moves_l2" in tol and rel > tol["moves_l2"]:
            out.append(
                f"{dtype}: the {what} moves differ by {rel:.2e} in L2 relative (tolerance {tol['moves_l2']})"
            )
    losses = row["loss_torch"]
    if not min(losses[1:]) < losses[0]:
        out.append(f"{dtype}: the loss did not decrease ({losses[0]:.4g} -> {min(losses):.4g})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="the tests' tiny Llama on this machine's device (CPU: TRITON_INTERPRET=1)",
    )
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--out", default=None)
    add_check_args(ap)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the verdict compares the loss after the first step)")
    if args.check_args:
        return checked(
            "convergence.py",
            model="tests' tiny Llama" if args.tiny else "Qwen2.5-0.5B config",
            parameters=None if args.tiny else meta_parameters(qwen_05b_config()),
            dtypes=["fp32"] if args.tiny else args.dtypes,
            steps=args.steps,
            sentences=args.sentences,
            tolerances=TOLERANCES,
            out=args.out or "bench/results/convergence-<device>.json",
        )
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.tiny and interpreting):
        print("convergence.py: the Triton path needs CUDA, or --tiny with TRITON_INTERPRET=1")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows, problems = [], []
    if args.tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

        row = compare(
            tiny_model("llama").to(device),
            tiny_tokenizer(),
            SOURCE,
            TARGET,
            steps=args.steps,
            lr=0.05,
            batch_size=4,
            pattern=NORMS["llama"],
        )
        row.update(model="tests' tiny Llama (3 layers, d = 32)", dtype="fp32")
        rows.append(row)
        problems += verdict(row, "fp32")
    else:
        from trainer_setup import sentences, word_tokenizer

        tok = word_tokenizer()
        src, tgt = sentences(args.sentences, 1), sentences(args.sentences, 2)
        for dt in args.dtypes:
            model = qwen_05b(DTYPES[dt], device)
            row = compare(model, tok, src, tgt, steps=args.steps)
            row.update(model="Qwen2.5-0.5B config, random weights", dtype=dt, sentences=args.sentences)
            rows.append(row)
            problems += verdict(row, dt)
            del model
            torch.cuda.empty_cache()
    for row in rows:
        print(
            f"{row['model']} {row['dtype']}: loss {row['loss_torch'][0]:.4g} -> "
            f"{row['loss_torch'][-1]:.4g}; triton vs torch: loss {row['max_loss_relative_diff']:.2e}"
            f" relative, map moves {row['max_move_relative_diff']:.2e} (largest element), "
            + ", ".join(f"{k} {v:.2e}" for k, v in row["moves_relative_l2"].items())
            + " (L2)",
            flush=True,
        )
    env = environment()
    name = env["device"].replace(" ", "_") if device == "cuda" else "cpu-interpreter"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"convergence-{name}.json")
    write_json(out, {**env, "tolerances": TOLERANCES, "problems": problems, "runs": rows})
    for p in problems:
        print("FAILED:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
