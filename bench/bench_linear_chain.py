"""The Linear-chain Function (fastjac.ops.linear_chain), forward and backward, on every backend it runs
on against the torch backend's ATen products: the JR quantities of an MLP 784-256-256-10 ensemble,
M = 5, B = 128, nproj = 1, float32, both modes."""
import pytest
import torch

from bench.suite import check_like_torch, op_backends
from fastjac import backends
from fastjac.ops import linear_chain

MEMBERS, BATCH, WIDTHS = 5, 128, (784, 256, 256, 10)


def make_inputs(mode, device):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, WIDTHS[0], generator=generator)
    weights = [(torch.randn(MEMBERS, out, fan_in, generator=generator) / fan_in ** 0.5).requires_grad_()
               for fan_in, out in zip(WIDTHS[:-1], WIDTHS[1:])]
    biases = [torch.zeros(MEMBERS, out).requires_grad_() for out in WIDTHS[1:]]
    projections = torch.randn(1, BATCH, WIDTHS[-1] if mode == "vjp" else WIDTHS[0], generator=generator)
    if mode == "vjp":
        projections = projections / projections.norm(dim=-1, keepdim=True)
    leaves = weights + biases
    return x.to(device), projections.to(device), [t.detach().to(device).requires_grad_() for t in leaves]


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("backend,device", op_backends())
def test_chain_penalty(benchmark, backend, device, mode, direction):
    if backends.get(backend).chain_products is None:
        pytest.skip(f"the chain Function does not run on {backend!r} (Backend.chain_products is None)")
    x, projections, leaves = make_inputs(mode, device)
    layers = len(WIDTHS) - 1
    weights, biases = leaves[:layers], leaves[layers:]

    def forward(name):
        spec = linear_chain.ChainSpec(mode, "members", (True,) * (layers - 1) + (False,), (True,) * layers,
                                      1.0 / BATCH, backends.get(name))
        return linear_chain.chain_penalty(spec, x, projections, weights, biases)

    grad_logits = torch.randn(MEMBERS, BATCH, WIDTHS[-1], generator=torch.Generator().manual_seed(1)).to(device)

    def backward(outputs):  # what a JR step's backward gets: a logits gradient and the penalty's weights
        logits, penalty = outputs
        return torch.autograd.grad((logits, penalty), leaves, (grad_logits, torch.ones_like(penalty)))

    check_like_torch(forward(backend), forward("torch"), length=WIDTHS[0], name=f"{backend} forward")
    check_like_torch(backward(forward(backend)), backward(forward("torch")), length=WIDTHS[0] * BATCH,
                     name=f"{backend} gradients")
    benchmark.group = f"linear_chain {mode} {direction}"
    if direction == "forward":
        benchmark(lambda: forward(backend))
    else:  # the backward alone: each round's forward is set-up, outside the timing
        benchmark.pedantic(backward, setup=lambda: ((forward(backend),), {}), rounds=20)
