"""stacked_linear, forward and backward, on every backend against its torch launcher, at the layers of an
MLP 784-256-256-10 jvp step: M = 5, B = 128, two streams (primal + one tangent), float32; the first layer
reads the input batch shared by the members, the second per-member rows."""
import pytest
import torch

from bench.suite import check_like_torch, op_backends, skip_if_same_launchers
from fastjac import backends
from fastjac.ops import stacked_linear as sl

MEMBERS, BATCH, STREAMS = 5, 128, 2
SHAPES = {"784->256 shared input": (True, 784, 256), "256->256 per member": (False, 256, 256)}


def make_inputs(shared, fan_in, out_features, device):
    generator = torch.Generator().manual_seed(0)
    rows = STREAMS * BATCH
    x = torch.randn((rows, fan_in) if shared else (MEMBERS, rows, fan_in), generator=generator)
    weight = torch.randn(MEMBERS, out_features, fan_in, generator=generator) / fan_in ** 0.5
    bias = torch.randn(MEMBERS, out_features, generator=generator)
    grad = torch.randn(MEMBERS, rows, out_features, generator=generator)
    return x.to(device), weight.to(device), bias.to(device), grad.to(device)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend,device", op_backends())
def test_stacked_linear(benchmark, backend, device, shape, direction):
    torch_launchers = (sl.stacked_linear_forward, sl.stacked_linear_backward)
    launchers = backends.get(backend).stacked_linear
    skip_if_same_launchers(backend, launchers, torch_launchers)
    shared, fan_in, out_features = SHAPES[shape]
    x, weight, bias, grad = make_inputs(shared, fan_in, out_features, device)
    _, mask = torch_launchers[0](x, weight, bias, STREAMS, True)
    needs_x_grad = not shared  # an input batch needs no gradient (as in a training step)
    calls = {"forward": lambda launch: launch[0](x, weight, bias, STREAMS, True),
             "backward": lambda launch: launch[1](grad, x, weight, mask, STREAMS, True, needs_x_grad)}
    check_like_torch(calls[direction](launchers), calls[direction](torch_launchers),
                     length=max(fan_in, STREAMS * BATCH), name=f"{backend} {direction}")
    benchmark.group = f"stacked_linear {direction}, {shape}"
    benchmark(lambda: calls[direction](launchers))
