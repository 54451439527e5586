"""bench/gpu_report.py turns a GPU session's result files into the README's target table: ratios
against the right baselines, met / missed at the issue's thresholds, "not measured" for a file
or row that is absent. Kernel and trainer files are written here in the scripts' format (no
GPU here); the generation file comes from a real (CPU) run of bench/generation.py."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import gpu_report  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def kernels_file(eager_ms, compile_ms, fwd_frac, bwd_frac):
    rows = [
        {
            "op": "loss",
            "provider": p,
            "n": 32,
            "d": 3584,
            "layers": 56,
            "mode": "full",
            "ms": ms,
            "peak_mib": 1.0,
        }
        for p, ms in (("lineas_fast", 1.0), ("torch_eager", eager_ms), ("torch_compile", compile_ms))
    ]
    rows.append(
        {
            "op": "loss",
            "provider": "torch_eager",
            "n": 32,
            "d": 3584,
            "layers": 28,
            "mode": "full",
            "ms": 1000.0,
            "peak_mib": 1.0,
        }
    )  # another shape: ignored
    rows += [
        {
            "op": "affine_steer",
            "provider": "lineas_fast",
            "tokens": 8192,
            "d": 3584,
            "dtype": "bfloat16",
            "mode": m,
            "ms": 0.1,
            "peak_mib": 0.0,
            "GB_per_s": 2000.0,
            "fraction_of_copy_bw": f,
        }
        for m, f in (("forward", fwd_frac), ("backward", bwd_frac))
    ]
    return {"results": rows}


def by_target(rows):
    return {r["target"]: r for r in rows}


def test_kernel_targets(tmp_path):
    (tmp_path / "kernels-GPU.json").write_text(json.dumps(kernels_file(12.0, 2.5, 0.85, 0.55)))
    rows = by_target(gpu_report.report("GPU", str(tmp_path)))
    eager = rows["loss fwd+bwd, 56 layers, n=32, d=3584, vs torch_eager"]
    assert (eager["measured"], eager["verdict"]) == ("12.0×", "met")
    assert rows["loss fwd+bwd, 56 layers, n=32, d=3584, vs torch_compile"]["verdict"] == "missed"
    assert rows["intervention forward, 8192×3584 bf16, of copy bandwidth"]["verdict"] == "met"
    assert rows["intervention backward, 8192×3584 bf16, of copy bandwidth"]["verdict"] == "missed"
    assert rows["lf.train step vs reference trainer, Qwen2.5-7B bf16"]["verdict"] == "not measured"


def test_trainer_targets_and_mfu(tmp_path):
    runs = [
        {
            "model": "Qwen2.5-1.5B config, random weights, bf16",
            "speedup": 6.0,
            "lineas_median_s": 0.05,
            "reference_median_s": 0.3,
            "lineas_mfu": 0.21,
            "reference_mfu": 0.35,
        },
        {
            "model": "Qwen2.5-7B config, random weights, bf16",
            "speedup": 4.2,
            "lineas_median_s": 0.2,
            "reference_median_s": 0.84,
        },
    ]
    (tmp_path / "trainer-GPU.json").write_text(json.dumps({"runs": runs}))
    rows = by_target(gpu_report.report("GPU", str(tmp_path)))
    small = rows["lf.train step vs reference trainer, Qwen2.5-1.5B bf16"]
    assert small["verdict"] == "met" and small["measured"] == "6.0× (50 vs 300 ms)"
    assert "21.0%" in small["note"]
    assert rows["lf.train step vs reference trainer, Qwen2.5-7B bf16"]["verdict"] == "missed"


@pytest.fixture(scope="module")
def generation_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "generation.py"),
            "--batch",
            "1",
            "2",
            "--prompt-len",
            "8",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--out",
            str(folder / "generation-GPU.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder


def test_generation_targets_from_a_real_run(generation_file):
    data = json.loads((generation_file / "generation-GPU.json").read_text())
    rows = [r for r in gpu_report.report("GPU", str(generation_file)) if "decode" in r["target"]]
    assert len(rows) == 3 and all(r["verdict"] in ("met", "missed") for r in rows)
    folded = next(r for r in rows if r["target"].startswith("folded"))
    res = data["results"]
    ratios = [
        f["decode_tok_s"] / u["decode_tok_s"]
        for f in res
        for u in res
        if f["provider"] == "folded" and u["provider"] == "unsteered" and f["batch"] == u["batch"]
    ]
    assert folded["measured"].startswith(f"{min(ratios):.1%}")
    assert folded["verdict"] == ("met" if min(ratios) >= 0.98 else "missed")
    assert "batch 1: " in folded["note"] and "batch 2: " in folded["note"]
    gated = next(r for r in rows if r["target"].startswith("DSAS"))
    ratios = [
        g["decode_tok_s"] / h["decode_tok_s"]
        for g in res
        for h in res
        if g["provider"] == "lineas_gated" and h["provider"] == "hooks" and g["batch"] == h["batch"]
    ]
    assert len(ratios) == 2 and gated["measured"].startswith(f"{min(ratios):.1%}")


def test_markdown_and_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_report.py"), "GPU", "--folder", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("| target |") and len(lines) == 2 + 4 + 2 + 3
    assert all("not measured" in line for line in lines[2:])
