"""bench/gpu_run.sh, the GPU benchmark runner, as far as it runs without a GPU: its plan fits the
budget it is given, bad arguments are refused, a stage that fails (here: a GPU benchmark on a
machine without CUDA) is recorded in the summary and the archive while the run goes on, and
every stage runs the interpreter the script was started with (a virtualenv's python stays in
its virtualenv)."""

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "bench", "gpu_run.sh")
PLAN_LINE = re.compile(r"^(?!total )(\w+)\s+(?:(\d+) s|skipped)\b", re.M)


def run(args, cwd=ROOT, **env):
    return subprocess.run(
        ["bash", os.path.join(cwd, "bench", "gpu_run.sh"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, **env},
    )


def plan(*args):
    proc = run(["--plan", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [(name, int(secs) if secs else None) for name, secs in PLAN_LINE.findall(proc.stdout)]
    total, budget = map(
        int, re.search(r"total (\d+) s of limits within a budget of (\d+) s", proc.stdout).groups()
    )
    return rows, total, budget


def test_default_plan_runs_every_stage_to_its_limit():
    rows, total, budget = plan()
    stages = re.search(r"^STAGES=\(([^)]*)\)", open(SCRIPT).read(), re.M).group(1).split()
    assert [name for name, _ in rows] == stages and stages[:2] == ["setup", "tests"]
    assert all(secs and secs > 0 for _, secs in rows)
    assert total == budget == sum(secs for _, secs in rows)


@pytest.mark.parametrize("budget", [0, 25, 300, 600, 100000])
@pytest.mark.parametrize("stages", [[], ["kernel-stages"], ["model-stages"], ["tests", "kernels"]])
def test_plan_sums_to_within_the_budget_given(budget, stages):
    rows, total, said = plan("--budget-s", str(budget), *stages)
    planned = [secs for _, secs in rows if secs is not None]
    assert said == budget and total == sum(planned) <= budget
    assert all(secs >= 20 for secs in planned)  # a stage with under 20 s left is skipped instead


def test_limits_and_groups_come_from_arguments():
    rows, total, _ = plan("--limit", "tests=33", "--limit", "kernels=44", "kernel-stages")
    limits = dict(rows)
    assert list(limits) == ["setup", "tests", "convergence", "kernels"]
    assert (limits["tests"], limits["kernels"]) == (33, 44) and total == sum(limits.values())
    rows, total, _ = plan("--budget-s", "100", "--limit", "tests=90", "tests", "kernels")
    assert rows == [("tests", 90), ("kernels", None)] and total == 90  # 10 s left: kernels skipped


@pytest.mark.parametrize(
    "args, says",
    [
        (["tests", "bogus"], "unknown stage bogus"),
        (["--limit", "bogus=3"], "--limit: unknown stage bogus"),
        (["--limit", "tests"], "--limit needs STAGE=SECONDS"),
        (["--budget-s", "ten"], "--budget-s needs whole seconds"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_bad_arguments_are_refused_with_exit_2(args, says):
    proc = run(args)
    assert proc.returncode == 2 and says in proc.stderr, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory):
    """A virtualenv's python that sees this interpreter's packages (a .pth adds its site
    directories) and appends its sys.prefix and command line to $GPU_RUN_STARTS each time it
    starts: a .pth line runs at every start."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert purelib != sysconfig.get_paths()["purelib"]
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    with open(os.path.join(purelib, "record_starts.pth"), "w") as f:
        f.writelines(f"import site; site.addsitedir({d!r})\n" for d in sys.path if d in ours)
        f.write(
            "import os, sys; os.environ.get('GPU_RUN_STARTS') and "
            "open(os.environ['GPU_RUN_STARTS'], 'a')"
            ".write(sys.prefix + '\\t' + ' '.join(sys.orig_argv) + '\\n')\n"
        )
    return str(venv), str(python)


def copy_of_tree(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(
        os.path.join(ROOT, "bench"), tree / "bench", ignore=shutil.ignore_patterns("results", "__pycache__")
    )
    return tree


def test_a_failing_stage_is_recorded_and_archived_by_the_python_it_was_given(tmp_path, venv_python):
    venv, python = venv_python
    tree, starts, scratch = copy_of_tree(tmp_path), tmp_path / "starts.txt", tmp_path / "tmp"
    scratch.mkdir()
    archive = tmp_path / "out" / "gpu-run.tar.gz"
    env = dict(
        PYTHON=python,
        GPU_RUN_STARTS=str(starts),
        LINEAS_FAST_COMMIT="abc123",
        TMPDIR=str(scratch),
        LINEAS_FAST_CACHE=str(tmp_path / "cache"),
    )

    proc = run(["--archive", str(archive), "setup", "kernels"], cwd=tree, **env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "kernels_gpu.py: no CUDA device" in proc.stdout
    summary = json.loads((tree / "bench" / "results" / "gpu-run-no-cuda.json").read_text())
    kernels = summary["stages"]["kernels"]
    assert kernels == {"exit": 2, "seconds": kernels["seconds"], "skipped": False}
    assert summary["stages"]["setup"]["exit"] == 1  # the copy has no setup.py to install
    assert summary["commit"] == "abc123 (LINEAS_FAST_COMMIT)"  # the copy has no .git
    assert summary["python_executable"] == python and summary["python_prefix"] == venv
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "bench/results/gpu-run-no-cuda.json" in names
    assert "bench/results/gpu-run-logs/kernels.log" in names
    # every python the run started is the virtualenv's, the stage's benchmark included
    lines = [line.split("\t") for line in starts.read_text().splitlines()]
    assert {prefix for prefix, _ in lines} == {venv}
    assert any("bench/kernels_gpu.py" in argv for _, argv in lines)
    assert os.listdir(scratch) == []  # the setup stage's temporary folder is gone
    # a later run over the same tree adds its stages to the summary
    proc = run(["trainer"], cwd=tree, **env)
    summary = json.loads((tree / "bench" / "results" / "gpu-run-no-cuda.json").read_text())
    assert set(summary["stages"]) == {"setup", "kernels", "trainer"}
    assert summary["stages"]["trainer"]["exit"] == 2


def test_stages_past_the_budget_are_skipped(tmp_path):
    tree = copy_of_tree(tmp_path)
    proc = run(["--budget-s", "10", "trainer", "generation"], cwd=tree)
    assert proc.returncode == 1
    assert proc.stdout.count("skipped, ") == 2
    summary = json.loads((tree / "bench" / "results" / "gpu-run-no-cuda.json").read_text())
    assert summary["stages"]["generation"]["skipped"] is True and summary["budget_s"] == 10
