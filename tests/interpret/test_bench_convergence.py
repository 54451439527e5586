"""bench/convergence.py end to end on the tests' tiny Llama through Triton's interpreter: the
script the GPU session runs at the real shape writes its result file and agrees with itself."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_convergence_script_tiny(tmp_path):
    out = tmp_path / "convergence.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "convergence.py"),
            "--tiny",
            "--steps",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["problems"] == [] and data["commit"]
    (run,) = data["runs"]
    assert len(run["loss_torch"]) == len(run["loss_triton"]) == 3
    assert run["loss_triton"][-1] < run["loss_triton"][0]
    assert run["max_loss_relative_diff"] <= 1e-4
    assert {m["param"] for m in run["moves"]} == {"omega", "bias"} and len(run["moves"]) == 6
    assert max(run["moves_relative_l2"].values()) <= 1e-3
