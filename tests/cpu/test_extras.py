"""A missing optional package is named with what to pip install, never a bare
ModuleNotFoundError: each feature is called in a real Python process where the package cannot be
imported (``sys.modules[name] = None``, as Python does for a package that is absent), or where it
is present but broken (a package of that name whose own import fails)."""

import json
import os
import subprocess
import sys

import pytest

# one process runs every case (imports once); each case blocks its package before calling
DRIVER = r"""
import json, os, sys
work = sys.argv[1]
import torch, lineas_fast as lf
from lineas_fast.cli import main

steering = os.path.join(work, "s.safetensors")
lf.Steering({"model.layers.0.post_attention_layernorm": (torch.ones(4), torch.zeros(4))}).save(steering)
pipeline = os.path.join(work, "pipe")
os.makedirs(pipeline)
open(os.path.join(pipeline, "model_index.json"), "w").write("{}")
gguf_in = os.path.join(work, "in.gguf")
open(gguf_in, "wb").write(b"GGUF" + bytes(60))


def plot_support(out):
    lf.Steering.load(steering).plot_support(out)

def demo_plot(out):
    from lineas_fast.apps.demo import plot_results
    plot_results([], out)

def sweep_plot(out):
    from lineas_fast.apps.sweep import plot_pareto
    plot_pareto({"rows": []}, out)

def fuse_gguf(out):
    lf.fuse_gguf(gguf_in, lf.Steering.load(steering), 1.0, out)

def image_grid(out):
    from lineas_fast.apps.diffusion import image_grid
    image_grid([]).save(out)

def toxicity_judge(out):
    from lineas_fast.apps.assets import toxicity_judge
    toxicity_judge()

def cli(argv):
    def run(out):
        code = main([*argv, out])
        if code != 0:
            raise SystemExit(code)
    return run

CASES = {
    "plot_support": ("matplotlib", plot_support),
    "demo plot": ("matplotlib", demo_plot),
    "sweep plot": ("matplotlib", sweep_plot),
    "lf.fuse_gguf": ("gguf", fuse_gguf),
    "image_grid": ("PIL", image_grid),
    "toxicity judge": ("profanity_check", toxicity_judge),
    "fuse --pipeline": ("diffusers", cli(["fuse", "--pipeline", pipeline, "--steering", steering, "--out"])),
    "fuse --gguf": ("gguf", cli(["fuse", "--gguf", gguf_in, "--steering", steering, "--out"])),
}
results = {}
for name in sys.argv[2:]:
    module, call = CASES[name]
    # what Python finds for a package that is not installed (its submodules too, where another
    # library imported them already)
    loaded = {k: v for k, v in sys.modules.items() if k == module or k.startswith(module + ".")}
    blocked = list(dict.fromkeys([module, *loaded]))
    sys.modules.update(dict.fromkeys(blocked))
    out = os.path.join(work, name.replace(" ", "_").replace("-", "") + ".out")
    try:
        call(out + (".gguf" if "gguf" in name else ""))
        results[name] = {"type": None}
    except SystemExit as e:
        results[name] = {"type": "SystemExit", "code": e.code}
    except BaseException as e:
        mro = [c.__name__ for c in type(e).__mro__]
        results[name] = {"type": type(e).__name__, "message": str(e), "mro": mro}
    written = [f for f in os.listdir(work) if f.endswith((".out", ".gguf")) and f != "in.gguf"]
    results[name]["written"] = written
    for k in blocked:
        del sys.modules[k]
    sys.modules.update(loaded)
print("RESULTS " + json.dumps(results))
"""

CASES = {
    # case: (error type, what the message names)
    "plot_support": (
        "MissingExtraError",
        ["Steering.plot_support", "'matplotlib'", "pip install matplotlib"],
    ),
    "demo plot": ("MissingExtraError", ["demo's plot", "pip install matplotlib", "lineas_fast[demo]"]),
    "sweep plot": (
        "MissingExtraError",
        ["sweep's Pareto plot", "pip install matplotlib", "lineas_fast[demo]"],
    ),
    "lf.fuse_gguf": ("MissingExtraError", ["lf.fuse_gguf", "pip install gguf", "lineas_fast[gguf]"]),
    "image_grid": ("MissingExtraError", ["image_grid", "pip install pillow", "lineas_fast[diffusers]"]),
    "toxicity judge": (
        "AssetError",
        ["toxicity judge", "pip install alt-profanity-check", "lineas_fast[demo]"],
    ),
}
CLI_CASES = {
    "fuse --pipeline": [
        "lineas-fast fuse: error: --pipeline ",
        "pip install diffusers",
        "lineas_fast[diffusers]",
    ],
    "fuse --gguf": ["lineas-fast fuse: error: --gguf needs the 'gguf' package", "pip install gguf"],
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    work = tmp_path_factory.mktemp("extras")
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(work), *CASES, *CLI_CASES],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line[len("RESULTS ") :]), proc.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_a_missing_package_is_named_with_its_install_command(outcomes, case):
    result = outcomes[0][case]
    error, fragments = CASES[case]
    assert result["type"] == error, result
    assert "ImportError" in result["mro"] or error == "AssetError"
    assert all(f in result["message"] for f in fragments), result["message"]
    assert result["written"] == []


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_the_cli_names_a_missing_package_and_exits_2(outcomes, case):
    results, stderr = outcomes
    assert results[case]["type"] == "SystemExit" and results[case]["code"] == 2
    line = next(x for x in stderr.splitlines() if x.startswith(CLI_CASES[case][0]))
    assert all(f in line for f in CLI_CASES[case][1:]), line
    assert results[case]["written"] == []


def test_a_broken_install_is_named_as_broken(tmp_path):
    """A package that is there but whose own import fails (one of its dependencies missing)."""
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import lineas_fast_test_no_such_dependency\n")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
        "import torch, lineas_fast as lf\n"
        "st = lf.Steering({'m': (torch.ones(4), torch.zeros(4))})\n"
        f"st.plot_support({str(tmp_path / 'support.png')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "lineas_fast.extras.MissingExtraError: Steering.plot_support needs the 'matplotlib'"
    )
    assert "installed but cannot be imported" in last and "lineas_fast_test_no_such_dependency" in last
    assert "pip install --force-reinstall matplotlib" in last
    assert not os.path.exists(tmp_path / "support.png")
