"""The gpu lane collects nothing on a machine without CUDA (tests/run.sh counts pytest's
'no tests collected' as a pass for a lane), except as a rehearsal before a GPU session:
``LINEAS_FAST_GPU_LANE_ON_CPU=1 TRITON_INTERPRET=1 python -m pytest tests/gpu`` runs the kernel
checks on the CPU through Triton's interpreter (slow; the CUDA-only tests skip).

``launches``: the keys (tests/launch_shapes.launch_key) of every Triton launch in a test; each
module's union is kept in ``LAUNCHED[module name]`` for its last test, which checks that the
module launched every configuration of its kernels (run a module whole: with pytest-xdist,
``--dist loadfile``)."""

import os

import pytest
import torch
from lane import LAUNCHED, REHEARSAL

collect_ignore_glob = [] if torch.cuda.is_available() or REHEARSAL else ["test_*.py"]


@pytest.fixture
def launches(request, monkeypatch):
    from launch_shapes import launch_key

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        from triton.runtime.interpreter import InterpretedFunction as Launcher
    else:
        from triton.runtime.jit import JITFunction as Launcher
    seen = set()
    run = Launcher.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            seen.add(launch_key(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(Launcher, "run", recording_run)
    yield seen
    LAUNCHED[request.module.__name__] |= seen
