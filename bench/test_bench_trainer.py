"""pytest-benchmark: one training step, lf.train vs the reference-style trainer, same model
(a SmolLM2-135M-sized Llama on CPU; 8 layers here to keep the suite short; the full 30-layer
comparison is bench/trainer_step.py).

    pytest bench/test_bench_trainer.py
"""

import statistics

import pytest
from trainer_setup import (
    lineas_step_times,
    reference_trainer_step_times,
    sentences,
    smollm2_sized,
    word_tokenizer,
)

PATTERN = r"model\.layers\.\d+\.post_attention_layernorm"


@pytest.mark.parametrize("provider", ["lineas_fast", "reference"])
def test_train_step(benchmark, provider):
    tok = word_tokenizer()
    src, tgt = sentences(32, 1), sentences(32, 2)
    fn = lineas_step_times if provider == "lineas_fast" else reference_trainer_step_times
    times = benchmark.pedantic(
        lambda: fn(smollm2_sized(8), tok, src, tgt, PATTERN, 2), rounds=1, iterations=1
    )
    benchmark.extra_info.update(provider=provider, step_s=times, median_step_s=statistics.median(times))
