"""bench/gpu_run.sh, the GPU benchmark runner, as far as it runs without a GPU: its plan fits the
budget it is given, and the one-session preset puts the issue's stages in its order of value
within 540 s; bad arguments are refused; the dry run installs the checkout offline and runs every
stage's script with its real arguments in check mode; a stage that fails (here: a GPU benchmark
on a machine without CUDA) is recorded in the summary and the archive while the run goes on, the
archive is rewritten after every stage (a run killed from outside leaves one), a test stage
stopped at its limit still writes its junit XML, a stage whose package is missing is recorded as
not runnable at once, and every stage runs the interpreter the script was started with (a
virtualenv's python stays in its virtualenv)."""

import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tarfile
import time
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "bench", "gpu_run.sh")
PLAN_LINE = re.compile(r"^(?!total |spare: )([\w.-]+)\s+(?:(\d+) s|skipped|(spare))\s", re.M)
SESSION = ["setup", "tests-core", "tests-sweep", "kernels", "trainer-1.5b", "decode-1.5b"]
SPARE = ["convergence", "device_map", "distributed", "diffusion"]


def run(args, cwd=ROOT, timeout=300, **env):
    return subprocess.run(
        ["bash", os.path.join(cwd, "bench", "gpu_run.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **env},
    )


def plan(*args, spare=None):
    """(rows (stage, planned seconds or None when skipped), total, budget); the spare stages'
    names are appended to ``spare`` when given (else there must be none)."""
    proc = run(["--plan", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = []
    for name, secs, is_spare in PLAN_LINE.findall(proc.stdout):
        if is_spare:
            assert spare is not None, proc.stdout
            spare.append(name)
        else:
            rows.append((name, int(secs) if secs else None))
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
@pytest.mark.parametrize(
    "stages", [[], ["kernel-stages"], ["model-stages"], ["tests", "kernels"], ["session"]]
)
def test_plan_sums_to_within_the_budget_given(budget, stages):
    rows, total, said = plan("--budget-s", str(budget), *stages, spare=[])
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


@pytest.mark.parametrize("budget", [[], ["--budget-s", "540"]])
def test_the_session_fits_540_s_in_the_issues_order_of_value(budget):
    """Set-up and GPU facts; the gpu lane's quick tests (CUDA graphs) then its every-configuration
    sweep; the loss and intervention benchmarks; one lf.train step on Qwen2.5-1.5B; folded vs
    unsteered decode; then what is left, only in time the others leave unused. Every stage of
    the session gets its whole limit even when each one before it runs to its own."""
    spare = []
    rows, total, said = plan(*budget, "session", spare=spare)
    assert [name for name, _ in rows] == SESSION and spare == SPARE
    assert said == 540 and total == sum(secs for _, secs in rows) <= 540
    limits = re.search(r"declare -A SESSION_LIMIT=\(([^)]*)\)", open(SCRIPT).read()).group(1)
    assert dict(rows) == {k: int(v) for k, v in re.findall(r"\[([\w.-]+)\]=(\d+)", limits)}
    assert total <= 530  # slack: the summary's start (torch import), archives, kill-after


def test_the_session_stages_run_what_the_issue_asks_for():
    text = open(SCRIPT).read()

    def body(stage):
        return re.search(rf"^stage_{stage}\(\) \{{(.*?)\}}$", text, re.M | re.S).group(1)

    core = body("tests_core")
    assert "test_cuda_graph.py" in core and "test_slot_steer_cuda_graph.py" in core
    assert "test_every_configuration_*.py" in body("tests_sweep")
    assert "--compile-at 56x3584" in body("kernels")  # torch.compile at the target shape only
    assert "--qwen 1.5B" in body("trainer_1_5b") and "7B" not in body("trainer_1_5b")
    decode = body("decode_1_5b")
    assert "--providers unsteered folded fused_norms" in decode and "7B" not in decode


def test_the_docs_give_the_session_command_and_its_plan():
    docs = open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8").read()
    assert "bash bench/gpu_run.sh --budget-s 540 --archive" in docs and " session" in docs
    proc = run(["--plan", "session"])
    for line in proc.stdout.splitlines():
        line = line.split("; python: ")[0]
        assert line in docs, line


@pytest.mark.parametrize(
    "args, says",
    [
        (["tests", "bogus"], "unknown stage bogus"),
        (["--limit", "bogus=3"], "--limit: unknown stage bogus"),
        (["--limit", "tests"], "--limit needs STAGE=SECONDS"),
        (["--budget-s", "ten"], "--budget-s needs whole seconds"),
        (["--frobnicate"], "unknown option --frobnicate"),
        (["--limit", "tests-core=ten"], "--limit needs STAGE=SECONDS"),
        (["sessions"], "unknown stage sessions"),
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
            ".write(sys.prefix + '\\t' + ' '.join(sys.orig_argv) + '\\t' + str(os.getpid()) + '\\n')\n"
        )
        # GPU_RUN_HANG=NAME: a python whose command line holds NAME sleeps (a stage that hangs);
        # GPU_RUN_NO_DIFFUSERS=1: diffusers cannot be imported (as on the GPU machine)
        f.write(
            "import os, sys, time; os.environ.get('GPU_RUN_HANG') and "
            "os.environ['GPU_RUN_HANG'] in ' '.join(sys.orig_argv) and time.sleep(120)\n"
        )
        f.write(
            "import os, sys; os.environ.get('GPU_RUN_NO_DIFFUSERS') and "
            "sys.modules.__setitem__('diffusers', None)\n"
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
    assert kernels == {"exit": 2, "seconds": kernels["seconds"], "limit_s": 150, "skipped": False}
    assert summary["finished"] is True and summary["exit_status"] == 1 and summary["gpu"] is None
    assert summary["stages"]["setup"]["exit"] == 1  # the copy has no setup.py to install
    assert summary["commit"] == "abc123 (LINEAS_FAST_COMMIT)"  # the copy has no .git
    assert summary["python_executable"] == python and summary["python_prefix"] == venv
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "bench/results/gpu-run-no-cuda.json" in names
    assert "bench/results/gpu-run-logs/kernels.log" in names
    # every python the run started is the virtualenv's, the stage's benchmark included
    lines = [line.split("\t") for line in starts.read_text().splitlines()]
    assert {prefix for prefix, _, _ in lines} == {venv}
    assert any("bench/kernels_gpu.py" in argv for _, argv, _ in lines)
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


def full_tree(tmp_path):
    """A copy of what the GPU machine gets: the checkout without .git and without results."""
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns("results", "__pycache__", "*.egg-info", "build")
    for name in ("lineas_fast", "kernels", "bench", "tests"):
        shutil.copytree(os.path.join(ROOT, name), tree / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tree / name)
    return tree


OFFLINE = dict(  # pip may not reach an index, nor anything else through a proxy
    PIP_NO_INDEX="1",
    PIP_CONFIG_FILE=os.devnull,
    http_proxy="http://127.0.0.1:9",
    https_proxy="http://127.0.0.1:9",
    HTTP_PROXY="http://127.0.0.1:9",
    HTTPS_PROXY="http://127.0.0.1:9",
)


def test_the_dry_run_installs_offline_and_checks_every_stage(tmp_path):
    """The session and every other stage in check mode on this CPU: the checkout installed
    into a temporary folder without a package index (and removed), each test stage collecting
    its files through the gpu lane's CPU rehearsal, each benchmark script run with the stage's
    own arguments and --check-args; nothing written under bench/results."""
    tree, scratch = full_tree(tmp_path), tmp_path / "tmp"
    scratch.mkdir()
    stages = ["session", "tests", "trainer", "generation"]  # every stage once
    proc = run(
        ["--dry-run", *stages],
        cwd=tree,
        timeout=900,
        TMPDIR=str(scratch),
        LINEAS_FAST_COMMIT="abc123",
        LINEAS_FAST_CACHE=str(tmp_path / "cache"),
        **OFFLINE,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    ran = re.findall(r"^=== stage ([\w.-]+): exit (\d+)", proc.stdout, re.M)
    assert [name for name, _ in ran] == SESSION + SPARE + ["tests", "trainer", "generation"], out[-3000:]
    assert all(rc == "0" for _, rc in ran)
    site_used = re.search(r"^lineas_fast \S+ from (\S+)", proc.stdout, re.M).group(1)
    assert site_used.startswith(str(scratch)), site_used  # the installed copy, not ./lineas_fast
    for script in ("kernels_gpu", "trainer_step", "generation", "convergence", "device_map", "diffusion"):
        assert f"{script}.py --check-args: ok" in proc.stdout, script
    assert '"qwen": ["1.5B"]' in proc.stdout and '"qwen": ["1.5B", "7B"]' in proc.stdout
    assert '"providers": ["unsteered", "folded", "fused_norms"]' in proc.stdout
    assert '"torch_compile_at": [[56, 3584]]' in proc.stdout
    assert "distributed.py --check-args: ok" in proc.stdout
    collected = dict(re.findall(r"^(tests/gpu/test_\w+\.py): (\d+)", proc.stdout, re.M))
    for name in ("cuda_graph", "slot_steer_cuda_graph", "gpu_kernels"):
        assert int(collected[f"tests/gpu/test_{name}.py"]) > 0, name
    for kernel in ("affine", "gated", "loss", "rms"):
        assert int(collected[f"tests/gpu/test_every_configuration_{kernel}.py"]) > 0, kernel
    assert "every stage's check passed" in proc.stdout
    assert not (tree / "bench" / "results").exists()
    assert os.listdir(scratch) == []  # the installed copy and the dry run's logs are gone


def test_setup_copies_the_package_when_pip_cannot_build_it(tmp_path):
    tree, scratch = full_tree(tmp_path), tmp_path / "tmp"
    scratch.mkdir()
    (tree / "setup.py").write_text("raise SystemExit('no build backend here')\n")
    proc = run(["--dry-run", "setup", "kernels"], cwd=tree, TMPDIR=str(scratch), **OFFLINE)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "pip could not build this checkout; copying" in proc.stdout
    assert re.search(r"^lineas_fast \S+ from " + re.escape(str(scratch)), proc.stdout, re.M)
    assert "kernels_gpu.py --check-args: ok" in proc.stdout


def test_the_archive_is_rewritten_after_each_stage_and_survives_a_kill(tmp_path, venv_python):
    """The session on a machine without CUDA, killed from outside while its sixth stage hangs:
    the archive written after the fifth holds the summary of the five, marked unfinished."""
    _, python = venv_python
    tree, starts = copy_of_tree(tmp_path), tmp_path / "starts.txt"
    archive = tmp_path / "out" / "gpu-run.tar.gz"
    env = dict(os.environ, PYTHON=python, GPU_RUN_STARTS=str(starts), GPU_RUN_HANG="generation.py")
    env.update(LINEAS_FAST_COMMIT="abc123", LINEAS_FAST_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        ["bash", str(tree / "bench" / "gpu_run.sh"), "--archive", str(archive), "session"],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    hung = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not hung:
            time.sleep(1)
            if starts.exists():
                hung = [int(pid) for _, argv, pid in (x.split("\t") for x in starts.read_text().splitlines())
                        if "generation.py" in argv]  # fmt: skip
        assert hung, "the decode stage never started"
        time.sleep(2)
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its stage, as a machine's limit does
        proc.wait()
        for pid in hung:  # the hanging benchmark runs under timeout, in a process group of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        summary = json.load(tar.extractfile("bench/results/gpu-run-no-cuda.json"))
    assert "bench/results/gpu-run-logs/trainer-1.5b.log" in names
    assert list(summary["stages"]) == SESSION[:5] and summary["finished"] is False
    assert [row["stage"] for row in summary["plan"]] == SESSION + SPARE
    assert summary["stages"]["kernels"]["exit"] == 2 and summary["budget_s"] == 540


def test_a_stage_missing_its_package_is_recorded_as_not_runnable_at_once(tmp_path, venv_python):
    _, python = venv_python
    tree = copy_of_tree(tmp_path)
    t0 = time.time()
    proc = run(["diffusion"], cwd=tree, PYTHON=python, GPU_RUN_NO_DIFFUSERS="1", LINEAS_FAST_COMMIT="x")
    assert proc.returncode == 1 and time.time() - t0 < 60, proc.stdout + proc.stderr
    assert "=== stage diffusion: not runnable here: diffusers is not installed" in proc.stdout
    summary = json.loads((tree / "bench" / "results" / "gpu-run-no-cuda.json").read_text())
    row = summary["stages"]["diffusion"]
    assert row["skipped"] is True and row["exit"] is None and "diffusers is not installed" in row["reason"]


def test_a_test_stage_stopped_at_its_limit_still_writes_its_junit_xml(tmp_path):
    """The every-configuration sweep through the CPU rehearsal (slow: it cannot finish in 40 s)
    stopped by the stage's limit: pytest gets SIGINT 15 s before it, reports what passed and
    writes its junit XML; the stage is recorded with timeout's exit status 124."""
    tree = full_tree(tmp_path)
    proc = run(
        ["--limit", "tests-sweep=40", "tests-sweep"],
        cwd=tree,
        LINEAS_FAST_GPU_LANE_ON_CPU="1",
        TRITON_INTERPRET="1",
        LINEAS_FAST_COMMIT="abc123",
        LINEAS_FAST_CACHE=str(tmp_path / "cache"),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stage tests-sweep: stopped at its 40 s limit" in proc.stdout
    summary = json.loads((tree / "bench" / "results" / "gpu-run-no-cuda.json").read_text())
    assert summary["stages"]["tests-sweep"]["exit"] == 124
    xml = ET.parse(tree / "bench" / "results" / "gpu-run-logs" / "tests-sweep-no-cuda.xml").getroot()
    suite = xml if xml.tag == "testsuite" else xml.find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
