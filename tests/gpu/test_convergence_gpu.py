"""The Triton path and the PyTorch path give the same training run on a real-shaped model
(Qwen2.5-0.5B config, random weights), in fp32 and bf16: bench/convergence.py's comparison and
tolerances, over 10 steps here (the session script runs 30 and keeps the curves)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import convergence  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (rehearsal)")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_same_run_with_kernels_and_without(dtype):
    from trainer_setup import sentences, word_tokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    model = convergence.qwen_05b(convergence.DTYPES[dtype], "cuda")
    row = convergence.compare(model, word_tokenizer(), sentences(32, 1), sentences(32, 2), steps=10)
    assert convergence.verdict(row, dtype) == []
