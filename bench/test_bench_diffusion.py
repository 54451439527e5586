"""pytest-benchmark: one LinEAS step and one steered generation on the tiny pipeline."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
pytest.importorskip("diffusers")

from tiny_pipeline import SOURCE_PROMPTS, TARGET_PROMPTS, tiny_pipeline  # noqa: E402

import lineas_fast as lf  # noqa: E402

NORMS = r"unet\..*norm\d?"


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_pipeline()
    st = lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, modules=NORMS, steps=1, progress=False)
    return pipe, st


def test_train_step(benchmark, setup):
    pipe, _ = setup
    benchmark.pedantic(
        lambda: lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, modules=NORMS, steps=2, progress=False),
        rounds=2,
    )


@pytest.mark.parametrize("provider", ["unsteered", "lineas_hooks", "folded"])
def test_generate(benchmark, setup, provider):
    import copy

    pipe, st = setup
    run = pipe
    if provider == "folded":
        run = lf.fuse(copy.deepcopy(pipe), st)
    handle = st.attach(pipe) if provider == "lineas_hooks" else None

    def gen():
        g = torch.Generator().manual_seed(0)
        return run("a cat", num_inference_steps=5, generator=g, output_type="latent")

    try:
        benchmark.pedantic(gen, rounds=3, warmup_rounds=1)
    finally:
        if handle:
            handle.remove()
