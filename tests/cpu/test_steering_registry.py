"""lineas_fast.serve.registry.register_steering (no vLLM needed): a Steering object registered for
per-request serving is saved to a temporary file that engine processes read at start-up; that
file is removed when the name is registered again, by clear_steerings, and when the process that
saved it exits, so no file is left behind."""

import os
import subprocess
import sys

import torch

import lineas_fast as lf
from lineas_fast.serve import registry


def steering(seed: int) -> lf.Steering:
    g = torch.Generator().manual_seed(seed)
    return lf.Steering({"model.norm": (1 + 0.1 * torch.randn(8, generator=g), torch.randn(8, generator=g))})


def registered_path(name: str) -> str:
    return dict(registry.parse_env(os.environ[registry.ENV]))[name]


def test_temporary_files_are_removed_when_replaced_and_cleared(monkeypatch):
    monkeypatch.delenv(registry.ENV, raising=False)
    try:
        registry.register_steering("a", steering(0))
        first = registered_path("a")
        assert os.path.isfile(first)
        assert torch.equal(lf.Steering.load(first)["model.norm"][1], steering(0)["model.norm"][1])
        registry.register_steering("a", steering(1))  # the same name again: the first file goes
        second = registered_path("a")
        assert second != first and not os.path.exists(first) and os.path.isfile(second)
        registry.register_steering("b", steering(2))
        third = registered_path("b")
        registry.clear_steerings()
        assert not os.path.exists(second) and not os.path.exists(third)
        assert registry.ENV not in os.environ
    finally:
        registry.clear_steerings()


def test_a_registered_file_path_is_never_removed(tmp_path, monkeypatch):
    monkeypatch.delenv(registry.ENV, raising=False)
    path = tmp_path / "mine.safetensors"
    steering(3).save(str(path))
    try:
        registry.register_steering("mine", str(path))
        registry.register_steering("mine", steering(4))  # replaced by an object: the user's file stays
        registry.clear_steerings()
        assert path.is_file()
    finally:
        registry.clear_steerings()


def test_temporary_files_are_removed_when_the_process_exits(tmp_path):
    code = (
        "import os, torch, lineas_fast as lf\n"
        "from lineas_fast.serve import registry\n"
        "s = lf.Steering({'model.norm': (torch.ones(4), torch.zeros(4))})\n"
        "registry.register_steering('x', s)\n"
        "print(dict(registry.parse_env(os.environ[registry.ENV]))['x'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != registry.ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip().splitlines()[-1]
    assert path.endswith(".safetensors") and not os.path.exists(path)
