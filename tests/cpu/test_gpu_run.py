"""bench/gpu_session.sh, the GPU session's one entry script, as far as it runs without a GPU:
its plan fits the device tool's limits, and a stage that fails (here: a GPU benchmark on a
machine without CUDA) is recorded in the summary and the archive while the script goes on."""

import json
import os
import re
import shutil
import subprocess
import tarfile

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CALL_LIMIT_S = 600  # one device-tool command
SESSION_DEVICE_S = 30 * 60  # a developer session's device time


def run(args, cwd=ROOT, **env):
    return subprocess.run(
        ["bash", os.path.join(cwd, "bench", "gpu_session.sh"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, **env},
    )


def test_plan_fits_the_device_limits():
    proc = run(["--plan"])
    assert proc.returncode == 0, proc.stderr
    limits = dict(re.findall(r"^(\w+)\s+(\d+)s", proc.stdout, re.M))
    first, second = re.search(r"first: ([\w ]+); second: ([\w ]+);", proc.stdout).groups()
    assert set(first.split()) | set(second.split()) == set(limits)
    budget = int(
        re.search(
            r"SESSION_BUDGET_S:-(\d+)", open(os.path.join(ROOT, "bench", "gpu_session.sh")).read()
        ).group(1)
    )
    assert budget + 20 <= CALL_LIMIT_S
    for call in (first, second):
        assert sum(int(limits[s]) for s in call.split()) <= budget, call
    # two calls, each with a machine start of up to ~2.5 minutes, inside the session's time
    assert 2 * (CALL_LIMIT_S + 150) <= SESSION_DEVICE_S


def test_unknown_stage_is_refused():
    proc = run(["tests", "bogus"])
    assert proc.returncode == 2 and "unknown stage bogus" in proc.stdout


def copy_of_tree(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(
        os.path.join(ROOT, "bench"), tree / "bench", ignore=shutil.ignore_patterns("results", "__pycache__")
    )
    return tree


def test_a_failing_stage_is_recorded_and_archived(tmp_path):
    tree, out = copy_of_tree(tmp_path), tmp_path / "out"
    out.mkdir()
    proc = run(["kernels"], cwd=tree, OUT=str(out), LINEAS_FAST_COMMIT="abc123")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "kernels_gpu.py: no CUDA device" in proc.stdout
    summary = json.loads((tree / "bench" / "results" / "gpu-session-no-cuda.json").read_text())
    assert summary["stages"]["kernels"] == {
        "exit": 2,
        "seconds": summary["stages"]["kernels"]["seconds"],
        "skipped": False,
    }
    assert summary["commit"] == "abc123 (LINEAS_FAST_COMMIT)"  # the copy has no .git
    with tarfile.open(out / "gpu-session.tar.gz") as tar:
        names = tar.getnames()
    assert "bench/results/gpu-session-no-cuda.json" in names
    assert "bench/results/gpu-session-logs/kernels.log" in names
    # a second call over the same tree (the first archive unpacked) adds its stages
    proc = run(["trainer"], cwd=tree, OUT=str(out), LINEAS_FAST_COMMIT="abc123")
    summary = json.loads((tree / "bench" / "results" / "gpu-session-no-cuda.json").read_text())
    assert set(summary["stages"]) == {"kernels", "trainer"}
    assert summary["stages"]["trainer"]["exit"] == 2


def test_stages_past_the_call_budget_are_skipped(tmp_path):
    tree = copy_of_tree(tmp_path)
    proc = run(["trainer", "generation"], cwd=tree, SESSION_BUDGET_S="10")
    assert proc.returncode == 1
    assert proc.stdout.count("skipped, ") == 2
    summary = json.loads((tree / "bench" / "results" / "gpu-session-no-cuda.json").read_text())
    assert summary["stages"]["generation"]["skipped"] is True
