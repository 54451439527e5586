"""Where the gpu lane runs: CUDA, or the CPU in a rehearsal (LINEAS_FAST_GPU_LANE_ON_CPU=1 with
TRITON_INTERPRET=1, see conftest.py)."""

import collections
import os

import torch

REHEARSAL = os.environ.get("LINEAS_FAST_GPU_LANE_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAUNCHED: dict = collections.defaultdict(set)  # test module name -> launch keys (conftest)
