"""The README's "Measured on a GPU" table from one GPU session's result files: each target of
the GPU issue as a ratio measured in one run against its baseline, with met / missed / not
measured. Reads only files; computes nothing it did not find.

    python bench/gpu_report.py NVIDIA_H100_80GB_HBM3          # prints the markdown table
    python bench/gpu_report.py NVIDIA_H100_80GB_HBM3 --json   # the rows as JSON

Targets (the issue's): loss forward+backward at 56 layers, n = 32, d = 3584: ≥ 10× torch eager
and ≥ 3× torch.compile of the reference; the intervention at 8192 × 3584 bf16: forward ≥ 80%
and backward ≥ 60% of the device's copy bandwidth; one lf.train step ≥ 5× the reference-style
trainer on the Qwen2.5-1.5B and 7B configs (bf16; MFU reported beside); DSAS-gated decode at
most 3% slower than plain steered decode; folded and in-memory fused norms within 2% of
unsteered decode (every batch of the run: the worst is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _load(kind: str, device: str, folder: str):
    path = os.path.join(folder, f"{kind}-{device}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _row(target: str, value, need: str, ok, where: str, note: str = "") -> dict:
    return {
        "target": target,
        "measured": value,
        "needs": need,
        "verdict": "not measured" if ok is None else "met" if ok else "missed",
        "file": where,
        "note": note,
    }


def kernel_rows(data, where: str) -> list[dict]:
    def ms(op, provider, mode, **shape):
        for r in (data or {}).get("results", []):
            if (
                r["op"] == op
                and r["provider"] == provider
                and r["mode"] == mode
                and all(r.get(k) == v for k, v in shape.items())
            ):
                return r
        return None

    out, shape = [], dict(layers=56, d=3584)
    ours = ms("loss", "lineas_fast", "full", **shape)
    for base, need in (("torch_eager", 10.0), ("torch_compile", 3.0)):
        ref = ms("loss", base, "full", **shape)
        ratio = ref["ms"] / ours["ms"] if ours and ref else None
        out.append(
            _row(
                f"loss fwd+bwd, 56 layers, n=32, d=3584, vs {base}",
                None if ratio is None else f"{ratio:.1f}×",
                f"≥ {need:g}×",
                None if ratio is None else ratio >= need,
                where,
            )
        )
    for mode, need in (("forward", 0.8), ("backward", 0.6)):
        r = ms("affine_steer", "lineas_fast", mode, tokens=8192, d=3584)
        frac = r["fraction_of_copy_bw"] if r else None
        out.append(
            _row(
                f"intervention {mode}, 8192×3584 bf16, of copy bandwidth",
                None if frac is None else f"{frac:.0%} ({r['GB_per_s']:.0f} GB/s)",
                f"≥ {need:.0%}",
                None if frac is None else frac >= need,
                where,
            )
        )
    return out


def trainer_rows(data, where: str) -> list[dict]:
    out = []
    for size in ("1.5B", "7B"):
        run = next((r for r in (data or {}).get("runs", []) if f"Qwen2.5-{size}" in r["model"]), None)
        note = ""
        if run and "lineas_mfu" in run:
            note = f"MFU lf.train {run['lineas_mfu']:.1%}, reference {run['reference_mfu']:.1%}"
        out.append(
            _row(
                f"lf.train step vs reference trainer, Qwen2.5-{size} bf16",
                None
                if run is None
                else f"{run['speedup']:.1f}× "
                f"({run['lineas_median_s'] * 1e3:.0f} vs "
                f"{run['reference_median_s'] * 1e3:.0f} ms)",
                "≥ 5×",
                None if run is None else run["speedup"] >= 5.0,
                where,
                note,
            )
        )
    return out


def generation_rows(data, where: str) -> list[dict]:
    rows = (data or {}).get("results", [])
    out = []
    models = sorted({r["model"] for r in rows})
    # plain steered decode: lineas_fast.serve.bench's "hooks" ("lineas_hooks" in older files)
    checks = [
        (
            "DSAS-gated decode vs plain steered decode",
            "lineas_gated",
            ("hooks", "lineas_hooks"),
            0.97,
            "≥ 97% (≤ 3% slower)",
        ),
        ("folded decode vs unsteered", "folded", ("unsteered",), 0.98, "≥ 98%"),
        ("in-memory fused norms decode vs unsteered", "fused_norms", ("unsteered",), 0.98, "≥ 98%"),
    ]
    for target, provider, base, need, need_text in checks:
        for model in models or [None]:
            ratios = []
            for r in rows:
                if r["model"] == model and r["provider"] == provider:
                    b = next(
                        (
                            x
                            for x in rows
                            if x["model"] == model and x["provider"] in base and x["batch"] == r["batch"]
                        ),
                        None,
                    )
                    if b:
                        ratios.append((r["decode_tok_s"] / b["decode_tok_s"], r["batch"]))
            worst = min(ratios) if ratios else None
            label = f"{target}, {model.split(',')[0]}" if model else target
            out.append(
                _row(
                    label,
                    None if worst is None else f"{worst[0]:.1%} (worst batch: {worst[1]})",
                    need_text,
                    None if worst is None else worst[0] >= need,
                    where,
                    ", ".join(f"batch {b}: {x:.1%}" for x, b in sorted(ratios, key=lambda t: t[1])),
                )
            )
    return out


def report(device: str, folder: str = RESULTS) -> list[dict]:
    return (
        kernel_rows(_load("kernels", device, folder), f"kernels-{device}.json")
        + trainer_rows(_load("trainer", device, folder), f"trainer-{device}.json")
        + generation_rows(_load("generation", device, folder), f"generation-{device}.json")
    )


def markdown(rows: list[dict]) -> str:
    lines = ["| target | measured | needs | verdict | note |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['target']} | {r['measured'] or '—'} | {r['needs']} | {r['verdict']} | {r['note']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("device", help="the device part of the result files' names")
    ap.add_argument("--folder", default=RESULTS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = report(args.device, args.folder)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
