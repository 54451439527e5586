"""pytest-benchmark: one greedy generation (prompt 32, 8 new tokens) per steering provider on a
SmolLM2-135M-sized Llama (12 layers here to keep the suite short; full runs: generation.py)."""

import pytest
from generation_setup import PROVIDERS, prepare, random_steering
from trainer_setup import smollm2_sized


@pytest.fixture(scope="module")
def model():
    return smollm2_sized(12)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 8])
def test_generate(benchmark, model, provider, batch):
    import torch

    run, handle = prepare(provider, model, random_steering(model))
    ids = torch.randint(3, model.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            benchmark.pedantic(
                lambda: run.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=8,
                    min_new_tokens=8,
                    do_sample=False,
                    pad_token_id=0,
                ),
                rounds=3,
                warmup_rounds=1,
            )
    finally:
        if handle:
            handle.remove()
    benchmark.extra_info.update(provider=provider, batch=batch, new_tokens=8)
