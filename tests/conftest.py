"""Test lanes (see tests/run.sh): tests/cpu runs the PyTorch paths; tests/interpret runs the
Triton kernels on CPU and needs TRITON_INTERPRET=1 set before Triton is imported; tests/compile
builds every kernel for sm_80/sm_90 and needs it unset. Each lane collects only its own folder."""

import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

_interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_rehearsal = os.environ.get("LINEAS_FAST_GPU_LANE_ON_CPU") == "1"  # see tests/gpu/conftest.py
collect_ignore = ["compile", "cpu"] + ([] if _rehearsal else ["gpu"]) if _interpreting else ["interpret"]


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raising KeyboardInterrupt, as in an interactive Python (a background job started
    by a non-interactive shell inherits SIGINT ignored, and an ignored signal stays ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
