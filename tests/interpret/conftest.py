"""Fixtures of the interpreter lane."""

import collections

import pytest


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts Triton kernel launches by kernel name (``counts["_affine_steer_fwd_kernel"]``)
    while the test runs, so a test can tell that the kernels ran rather than a fallback."""
    from triton.runtime.interpreter import InterpretedFunction

    counts = collections.Counter()
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            counts[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return counts
