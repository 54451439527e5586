"""Convergence, in the spirit of Liger-Kernel's: a few real ``lf.train`` steps on a tiny Llama
with the Triton kernels (run by the interpreter: the steering maps' kernels in the hooks, the
Wasserstein loss, the DSAS gate) give the same loss curve and the same maps as the PyTorch path.

Per-op tests check each kernel's value and gradient against float64 oracles; this checks the
wiring end to end (the map on the right tensor and axis, gradients reaching ω, b and the gate,
the loss of the right layers) over several optimizer steps, where an error would compound.

Tolerances. Both paths compute in float32 and differ only in rounding order (fused
multiply-adds, reduction order). Measured: loss relative differences ≤ 1.4e-7 per step, the
DSAS control term (a squared difference of nearly equal activations, so with cancellation)
≤ 1.0e-6, and what each parameter moved differs by ≤ 9.6e-7 of the move. The bounds are ~100×
that: loss relative 1e-5 per step, control term relative 1e-4, and
|Δ_triton − Δ_torch| ≤ 1e-4·max|Δ_torch| for each parameter tensor, Δ being final minus
initial value. A wiring error moves the step ≥ 1 loss or some coordinate's update by
far more. Adam's update is invariant to a per-coordinate gradient scale, so a gradient that is
off by a constant factor is caught by the SGD runs, whose update is the gradient itself.
"""

import collections

import pytest
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf

CONTROL = [
    "the sun rises in the east",
    "a table has four legs",
    "water boils when heated",
    "birds fly south in winter",
    "the library opens at nine",
    "trains run on rails",
    "maps show roads and rivers",
    "bread is baked in ovens",
]
LOSS_RTOL = 1e-5  # relative, each step's loss and per-layer loss
CONTROL_RTOL = 1e-4  # relative, each step's DSAS control term
DELTA_RTOL = 1e-4  # on what each parameter tensor moved, relative to its largest move
# batch_size 4 of the 8 sources against 9 targets: minibatches (the same in both runs, same
# seed) and the n ≠ m target profile
COMMON = dict(batch_size=4, seed=1)


def run(backend, **kw):
    """Train from identical starting points; returns (steering, history, kernel launches)."""
    from triton.runtime.interpreter import InterpretedFunction

    counts = collections.Counter()
    original = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return original(self, *args, **kwargs)

    hist = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpretedFunction, "run", counting_run)
        st = lf.train(
            tiny_model("llama"),
            tiny_tokenizer(),
            SOURCE,
            TARGET,
            modules=NORMS["llama"],
            progress=False,
            backend=backend,
            callback=hist.append,
            **COMMON,
            **kw,
        )
    return st, hist, counts


def assert_same_run(ref, got):
    (ref_st, ref_hist, ref_counts), (st, hist, _) = ref, got
    assert sum(ref_counts.values()) == 0  # the PyTorch path ran no kernel
    assert [r.step for r in hist] == [r.step for r in ref_hist]
    assert [r.loss for r in hist] == pytest.approx([r.loss for r in ref_hist], rel=LOSS_RTOL)
    assert [r.control_loss for r in hist] == pytest.approx(
        [r.control_loss for r in ref_hist], rel=CONTROL_RTOL
    )
    for r, rr in zip(hist, ref_hist):
        assert r.per_layer == pytest.approx(rr.per_layer, rel=LOSS_RTOL)
        assert r.support == rr.support
    assert st.modules == ref_st.modules and set(st.gates) == set(ref_st.gates)
    for n in ref_st.modules:
        pairs = {"omega": (st[n][0], ref_st[n][0], 1.0), "bias": (st[n][1], ref_st[n][1], 0.0)}
        if n in ref_st.gates:  # gates start at w = 0, c = 0 (sigmoid)
            pairs["w"] = (st.gates[n]["w"], ref_st.gates[n]["w"], 0.0)
            pairs["c"] = (st.gates[n]["c"], ref_st.gates[n]["c"], 0.0)
        for what, (a, b, start) in pairs.items():
            moved = (b.double() - start).abs().max().item()
            assert moved > 0, (n, what)
            err = (a.double() - b.double()).abs().max().item()
            assert err <= DELTA_RTOL * moved, (n, what, err, moved)


@pytest.fixture(scope="module")
def adam_runs():
    kw = dict(steps=5, optimizer="adam", lr=0.05)
    return run("torch", **kw), run("triton", **kw)


def test_adam_same_loss_curve_and_maps(adam_runs):
    ref, got = adam_runs
    assert_same_run(ref, got)
    losses = [r.loss for r in got[1]]
    assert len(losses) == 5 and min(losses[1:]) < 0.7 * losses[0]  # it did train
    counts = got[2]
    assert counts["_wasserstein_fwd_kernel"] == 5  # one launch per step
    assert counts["_affine_steer_fwd_kernel"] >= 3 * 5  # 3 modules per step
    assert counts["_affine_steer_bwd_kernel"] >= 3 * 5


def test_sgd_same_loss_curve_and_maps():
    """The published recipe (SGD, lr 0.1): each update is the gradient itself."""
    kw = dict(steps=3, optimizer="sgd", lr=0.1)
    got = run("triton", **kw)
    assert_same_run(run("torch", **kw), got)
    assert got[2]["_affine_steer_bwd_kernel"] >= 3 * 3 and got[2]["_wasserstein_fwd_kernel"] == 3


def test_gated_end_to_end_same_run():
    """Two steps of end-to-end DSAS: the gate's gradient is exactly 0 at step 0 (the maps are
    the identity), so step 1 is the first to move it. SGD, as Adam's first update of a
    parameter is ±lr whatever its gradient's size."""
    kw = dict(steps=2, optimizer="sgd", lr=0.1, gate="e2e", control=CONTROL, control_weight=5.0)
    got = run("triton", **kw)
    assert_same_run(run("torch", **kw), got)
    counts = got[2]
    assert counts["_gated_steer_fwd_kernel"] >= 3 * 2 * 2  # source and control batches
    assert counts["_gated_steer_bwd_kernel"] >= 3 * 2 * 2
    assert counts["_wasserstein_fwd_kernel"] == 2 and counts["_affine_steer_fwd_kernel"] == 0
