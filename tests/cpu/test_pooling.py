"""What one sample is (SPEC §1): ``lineas_fast.pooling`` against plain-Python loops over the
elements (no tensor expression shared with the implementation)."""

import random

import pytest
import torch
from tiny_models import NORMS, SOURCE, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.pooling import length_buckets, masked_mean, pack_rows, pool_image, segment_means


def loop_masked_mean(h, mask):
    """Mean over the positions t with mask[b][t] == 1, one Python float at a time."""
    B, T, d = len(h), len(h[0]), len(h[0][0])
    out = []
    for b in range(B):
        real = [t for t in range(T) if mask[b][t]]
        out.append([sum(float(h[b][t][k]) for t in real) / len(real) for k in range(d)])
    return out


def masks(T):
    """Right padding, left padding, a full row and a one-token row (as lists of 0/1)."""
    return [[1] * 3 + [0] * (T - 3), [0] * (T - 2) + [1] * 2, [1] * T, [0, 0, 1] + [0] * (T - 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32])
def test_masked_mean_left_and_right_padding(dtype, mask_dtype):
    gen = torch.Generator().manual_seed(0)
    T, d = 6, 5
    h = (torch.randn(4, T, d, generator=gen) * 3 + 1).to(dtype)
    m = masks(T)
    got = masked_mean(h, torch.tensor(m).to(mask_dtype))
    assert got.shape == (4, d) and got.dtype == torch.float32
    expected = torch.tensor(loop_masked_mean(h.double().tolist(), m), dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_masked_mean_ignores_what_padding_holds():
    """Padded positions may hold anything (huge values): they must not leak into the mean."""
    h = torch.randn(2, 5, 3)
    m = [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    for b, row in enumerate(m):
        for t, keep in enumerate(row):
            if not keep:
                h[b, t] = 1e30
    got = masked_mean(h, torch.tensor(m))
    torch.testing.assert_close(
        got.double(), torch.tensor(loop_masked_mean(h.tolist(), m), dtype=torch.float64)
    )


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 1, 1), (3, 2, 7)])
def test_pool_image(shape):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    got = pool_image(h)
    hl = h.double().tolist()
    if len(shape) == 4:  # (B, C, H, W): mean over H and W per channel
        B, C, H, W = shape
        expected = [
            [sum(hl[b][c][i][j] for i in range(H) for j in range(W)) / (H * W) for c in range(C)]
            for b in range(B)
        ]
    else:  # (B, T, C): mean over the tokens per channel
        B, T, C = shape
        expected = [[sum(hl[b][t][c] for t in range(T)) / T for c in range(C)] for b in range(B)]
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[-3 if len(shape) == 4 else -1])
    torch.testing.assert_close(
        got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6
    )
    flat = torch.randn(3, 4, dtype=torch.float64)
    assert pool_image(flat).dtype == torch.float32
    assert pool_image(flat).tolist() == flat.float().tolist()  # (B, C): unchanged


def test_length_buckets_worked_example():
    # sorted lengths 5, 5, 6 | 50, 51: {5, 5, 6} pads to 3·6 = 18 <= 1.25·16; adding 50 would
    # pad to 4·50 = 200 > 1.25·66; {50, 51} pads to 102 <= 1.25·101.
    assert length_buckets([5, 5, 50, 51, 6]) == [[0, 1, 4], [2, 3]]
    assert length_buckets([]) == []
    assert length_buckets([7]) == [[0]]
    assert length_buckets([3, 3, 3], max_waste=0.0) == [[0, 1, 2]]  # no padding at all
    assert length_buckets([1, 2], max_waste=0.0) == [[0], [1]]


@pytest.mark.parametrize("max_waste", [0.0, 0.1, 0.25, 1.0])
@pytest.mark.parametrize("seed", range(5))
def test_length_buckets_properties(max_waste, seed):
    """A partition of the indices, in non-decreasing length order, each bucket within the waste
    bound, and greedy: the next bucket's shortest sentence would break the previous bound."""
    rnd = random.Random(seed)
    lengths = [rnd.randint(1, 60) for _ in range(rnd.randint(1, 40))]
    buckets = length_buckets(lengths, max_waste=max_waste)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(b for b in buckets)
    flat_lengths = [lengths[i] for i in flat]
    assert all(a <= b for a, b in zip(flat_lengths, flat_lengths[1:]))
    for b in buckets:
        padded, real = max(lengths[i] for i in b) * len(b), sum(lengths[i] for i in b)
        assert padded <= (1 + max_waste) * real + 1e-9
    for prev, nxt in zip(buckets, buckets[1:]):
        grown = prev + [nxt[0]]
        padded = max(lengths[i] for i in grown) * len(grown)
        assert padded > (1 + max_waste) * sum(lengths[i] for i in grown)


def test_target_pools_each_sentence_over_its_own_tokens():
    """A language model's pooled activation of one sentence is the mean of the module output
    over that sentence's tokens alone (each run unpadded, one at a time here), whatever the
    batching and padding the library uses."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    target = lf.as_target(model, tok)
    names = target.match(NORMS["llama"])
    got = target.pooled(target.encode(SOURCE), names)
    for r, sentence in enumerate(SOURCE):
        ids = tok([sentence], return_tensors="pt")["input_ids"]
        seen = {}
        hooks = [
            target.named[n].register_forward_hook(
                lambda _m, _a, out, n=n: seen.__setitem__(n, out[0].double().tolist())
            )
            for n in names
        ]
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            for hk in hooks:
                hk.remove()
        for n in names:
            rows = seen[n]
            mean = [sum(row[k] for row in rows) / len(rows) for k in range(len(rows[0]))]
            torch.testing.assert_close(
                got[n][r].double(), torch.tensor(mean, dtype=torch.float64), rtol=1e-5, atol=1e-5
            )


def test_pack_rows_worked_example():
    # longest first: 51 | 50 | 6 (no room left beside 51 or 50), then 5 and 5 beside the 6
    assert pack_rows([5, 5, 50, 51, 6]) == [[3], [2], [4, 0, 1]]
    assert pack_rows([5, 5, 50, 51, 6], capacity=61) == [[3, 4], [2, 0, 1]]
    assert pack_rows([]) == []
    assert pack_rows([4, 4, 4, 4], capacity=8) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="capacity=5 is shorter than the longest sentence"):
        pack_rows([3, 6], capacity=5)


@pytest.mark.parametrize("seed", range(8))
def test_pack_rows_properties(seed):
    """A partition of the indices; every row within capacity; each row longest first; and
    first-fit: no later row's first sentence would have fitted beside an earlier row's."""
    rnd = random.Random(seed)
    lengths = [rnd.randint(1, 60) for _ in range(rnd.randint(1, 50))]
    cap = rnd.choice([None, max(lengths), max(lengths) + rnd.randint(0, 40)])
    rows = pack_rows(lengths, cap)
    cap = max(lengths) if cap is None else cap
    flat = [i for r in rows for i in r]
    assert sorted(flat) == list(range(len(lengths))) and all(rows)
    fills = [sum(lengths[i] for i in r) for r in rows]
    assert max(fills) <= cap
    for r in rows:
        assert all(lengths[a] >= lengths[b] for a, b in zip(r, r[1:]))
    for i, later in enumerate(rows):
        for j in range(i):
            assert fills[j] + lengths[later[0]] > cap, (j, i)


def test_segment_means_against_a_loop():
    gen = torch.Generator().manual_seed(3)
    starts, lengths, total, d = [7, 0, 12, 3], [2, 3, 1, 4], 14, 5
    h = torch.randn(total, d, generator=gen, dtype=torch.float64)
    w = segment_means(starts, lengths, total)
    assert w.shape == (4, total) and w.dtype == torch.float32
    got = w.double() @ h
    hl = h.tolist()
    for k, (s, n) in enumerate(zip(starts, lengths)):
        expected = [sum(hl[t][c] for t in range(s, s + n)) / n for c in range(d)]
        torch.testing.assert_close(got[k], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"segment 1 = \[13, 15\) is empty or outside"):
        segment_means([0, 13], [2, 2], 14)
    with pytest.raises(ValueError, match="differ in length"):
        segment_means([0], [1, 2], 4)
