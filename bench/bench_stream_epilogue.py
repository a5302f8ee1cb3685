"""stream_epilogue, forward and backward, on every backend against its torch launcher, at the shapes of an
MLP JR step (member-major Linear output) and of LeNet's first convolution (row-major conv output); M = 5,
B = 128, two streams (primal + one tangent), float32."""
import pytest
import torch

from bench.suite import check_like_torch, op_backends, skip_if_same_launchers
from fastjac import backends
from fastjac.ops import stream_epilogue as se

# name -> (O, S, I, NB, rep): y [O, S, I], bias [O, NB], bias index (i // rep) % NB (fastjac/ops/stream_epilogue.py)
SHAPES = {"mlp hidden 256": (5, 2, 128 * 256, 256, 1), "lenet conv1": (1, 2, 128 * 5 * 6 * 28 * 28, 5 * 6, 28 * 28)}


def make_inputs(shape, device):
    o, s, length, nb, rep = shape
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(o, s, length, generator=generator).to(device)
    bias = torch.randn(o, nb, generator=generator).to(device)
    return y, bias, torch.randn(o, s, length, generator=generator).to(device)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend,device", op_backends())
def test_stream_epilogue(benchmark, backend, device, shape, direction):
    launchers = backends.get(backend).stream_epilogue
    skip_if_same_launchers(backend, launchers, se.TORCH_LAUNCHERS)
    forward, backward = launchers
    y, bias, grad = make_inputs(SHAPES[shape], device)
    rep = SHAPES[shape][4]
    _, mask = se.TORCH_LAUNCHERS[0](y, bias, rep, True)
    calls = {"forward": lambda launch: launch[0](y, bias, rep, True),
             "backward": lambda launch: launch[1](grad, mask, bias.shape[1], rep, True)}
    check_like_torch(calls[direction](launchers), calls[direction](se.TORCH_LAUNCHERS),
                     length=y.shape[2] // bias.shape[1], name=f"{backend} {direction}")
    benchmark.group = f"stream_epilogue {direction}, {shape}"
    benchmark(lambda: calls[direction]((forward, backward)))
