"""What ``pip install .`` installs: a wheel built from this checkout holds every module of
lineas_fast/ (its subpackages included) and kernels/ (as lineas_fast.kernels), and imports from
where it was installed; and the repository's kernels/ folder, found as a top-level ``kernels``
when the repository root is on sys.path (``python -m pytest`` from the root), does not shadow
the PyPI package of that name (Hugging Face's, which recent transformers imports)."""

import importlib.machinery
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def modules_in_tree() -> set[str]:
    """Paths inside the installed package of every .py file of the checkout's packages."""
    out = {
        str(p.relative_to(ROOT)) for p in (ROOT / "lineas_fast").rglob("*.py") if "__pycache__" not in p.parts
    }
    out |= {f"lineas_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    return out


def pip(command: str, *args: str) -> None:
    """``pip COMMAND -q --no-deps ARGS`` with this interpreter; fails the test naming pip's error."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", command, "-q", "--no-deps", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    pip("wheel", "--no-build-isolation", "-w", str(out), str(ROOT))
    (path,) = out.glob("lineas_fast-*.whl")
    return path


def test_the_wheel_holds_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(modules_in_tree() - names)
    assert not missing, f"not in the wheel: {missing}"
    assert "lineas_fast/serve/vllm_plugin.py" in names and "lineas_fast/training/trainer.py" in names


def test_the_installed_wheel_imports_every_module_from_where_it_was_installed(wheel, tmp_path):
    site = tmp_path / "site"
    pip("install", "--no-compile", "--target", str(site), str(wheel))
    code = (
        "import importlib, pkgutil, lineas_fast as lf\n"
        "names = [m.name for m in pkgutil.walk_packages(lf.__path__, 'lineas_fast.')]\n"
        "names = [n for n in names if not n.endswith('.__main__')]  # the CLI's, which runs it\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "print(lf.__file__)\n"
        "print(len(names))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, count = proc.stdout.split()[-2:]
    assert where.startswith(str(site)), where
    # every module but lineas_fast/__init__.py and the __main__ modules (lineas_fast/, cli/)
    assert int(count) >= len([m for m in modules_in_tree() if not m.endswith("/__main__.py")]) - 1


def run_in_root(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    """``python -c CODE`` from the repository root, which puts the root on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def installed_kernels_package():
    """The spec of a ``kernels`` package installed in this environment (not this folder), or None."""
    others = [p for p in sys.path if os.path.realpath(p or os.curdir) != str(ROOT)]
    return importlib.machinery.PathFinder.find_spec("kernels", others)


def test_the_repository_root_hands_kernels_over_to_the_pypi_package(tmp_path):
    """From the root, ``import kernels`` gets the installed package: Hugging Face's where it is
    installed (transformers then imports it while lineas_fast imports), otherwise a stand-in
    package put on PYTHONPATH."""
    real = installed_kernels_package()
    extra = None
    if real is None:
        fake = tmp_path / "kernels"
        fake.mkdir()
        (fake / "__init__.py").write_text("MARK = 'stand-in'\nfrom kernels.sub import X\n")
        (fake / "sub.py").write_text("X = 1\n")
        extra = str(tmp_path)
    proc = run_in_root(
        "import kernels, lineas_fast, lineas_fast.kernels as k\n"
        "print(kernels.__file__)\n"
        "print(k.__name__, k.__file__)\n",
        extra,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.strip().splitlines()[-2:]
    assert first == (real.origin if real is not None else str(tmp_path / "kernels" / "__init__.py"))
    assert second.startswith("lineas_fast.kernels ") and second.endswith("kernels/__init__.py")


def test_the_repository_root_without_a_kernels_package_keeps_lineas_fast_importable():
    """Without the PyPI package, ``import kernels`` from the root finds this folder, which stays
    an inert module (transformers probes the name), and lineas_fast imports."""
    real = installed_kernels_package()
    proc = run_in_root("import kernels, lineas_fast; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = real.origin if real is not None else str(ROOT / "kernels" / "__init__.py")
    assert proc.stdout.strip().splitlines()[-1] == want
