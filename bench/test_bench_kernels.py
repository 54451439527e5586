"""pytest-benchmark suite for the loss and intervention ops, per provider and mode
(forward, backward, full). Runs on CPU at small shapes; on CUDA at the paper's shapes.

    pytest bench/test_bench_kernels.py --benchmark-json bench/results/bench-kernels-cpu.json
"""

import pytest
import torch
from providers import loss_fn, loss_inputs, steer_fn

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PROVIDERS = ["lineas_fast", "torch_eager"] + (["torch_compile"] if CUDA else [])
LOSS_SHAPES = [(32, 3584, 56), (32, 1536, 28)] if CUDA else [(32, 576, 30)]
STEER_SHAPES = [(8192, 3584)] if CUDA else [(2048, 576)]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n,d,layers", LOSS_SHAPES)
@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
def test_loss(benchmark, provider, n, d, layers, mode):
    xs, ys = loss_inputs(n, d, layers, DEVICE)
    fwd = loss_fn(provider, xs, ys)
    benchmark.extra_info.update(
        provider=provider,
        n=n,
        d=d,
        layers=layers,
        mode=mode,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
    )
    if mode == "forward":
        with torch.no_grad() if provider != "lineas_fast" else torch.enable_grad():
            benchmark(lambda: (fwd(), _sync()))
    elif mode == "backward":

        def setup():
            return (fwd(),), {}

        benchmark.pedantic(lambda loss: (loss.backward(), _sync()), setup=setup, rounds=20)
    else:
        benchmark(lambda: (fwd().backward(), _sync()))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens,d", STEER_SHAPES)
@pytest.mark.parametrize("mode", ["forward", "full"])
def test_steer(benchmark, provider, tokens, d, mode):
    dtype = torch.bfloat16 if CUDA else torch.float32
    z = torch.randn(tokens, d, device=DEVICE, dtype=dtype, requires_grad=(mode == "full"))
    om = (torch.rand(d, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(d, device=DEVICE).requires_grad_()
    fwd = steer_fn(provider, z, om, b)
    benchmark.extra_info.update(provider=provider, tokens=tokens, d=d, mode=mode, dtype=str(dtype))
    if mode == "forward":
        with torch.no_grad():
            benchmark(lambda: (fwd(), _sync()))
    else:
        g = torch.ones(tokens, d, device=DEVICE, dtype=dtype)
        benchmark(lambda: (fwd().backward(g), _sync()))
