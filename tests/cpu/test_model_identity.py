"""``model_identity`` samples every parameter, the large ones included (an embedding of more than
2**24 values: its last position was once rounded past the end by a float32 linspace, an IndexError
on every rank of every distributed run of a model with such a parameter)."""

from __future__ import annotations

import torch

from lineas_fast.training.model_identity import SAMPLES, model_identity


def _model(n: int) -> torch.nn.Module:
    m = torch.nn.Module()
    m.weight = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16), requires_grad=False)
    return m


def test_a_parameter_beyond_float32_integers_is_sampled_to_its_last_value():
    m = _model(32000 * 1024)  # a 32000 x 1024 embedding, flattened; float32 rounds 32767999 up
    before = model_identity(m)
    m.weight[-1] = 1.0
    after = model_identity(m)
    assert after[0] == before[0] and after[1] != before[1]  # same structure, the last value read


def test_every_sampled_position_is_distinct_and_in_order():
    n = SAMPLES * 3 + 1
    zero = model_identity(_model(n))[1]
    m = _model(n)
    seen = []
    for i in range(n):
        m.weight.zero_()
        m.weight[i] = 1.0
        if model_identity(m)[1] != zero:
            seen.append(i)
    assert len(seen) == SAMPLES and seen[0] == 0 and seen[-1] == m.weight.numel() - 1
    assert seen == sorted(set(seen))
