"""The SGD-UAP ops on every backend against their torch launchers: perturb forward and backward (K = 4
perturbations of a batch of B = 128 images), the sign step; and the perturbed first Linear of an MLP
(784 -> 256, M = 5) on the backends that fuse it, against the unfused ATen computation (perturb, then the
stacked product), forward and backward; float32."""
import pytest
import torch

from bench.suite import check_like_torch, op_backends, skip_if_same_launchers
from fastjac import backends
from fastjac.ops import uap_step as ops

K, BATCH, MEMBERS, HIDDEN = 4, 128, 5, 256


def make_inputs(device):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, 28, 28, generator=generator)
    delta = (torch.rand(K, 1, 28, 28, generator=generator) - 0.5) * 0.2
    weight = torch.randn(MEMBERS, HIDDEN, 784, generator=generator) / 28
    bias = torch.randn(MEMBERS, HIDDEN, generator=generator)
    return [t.to(device) for t in (x, delta, weight, bias)]


@pytest.mark.parametrize("op", ["perturb forward", "perturb backward", "sign step"])
@pytest.mark.parametrize("backend,device", op_backends())
def test_uap_op(benchmark, backend, device, op):
    x, delta, _, _ = make_inputs(device)
    grad = torch.randn(K, *x.shape, device=device)
    step, eps = torch.full((K,), 0.02, device=device), torch.full((K,), 0.1, device=device)
    chosen = backends.get(backend)
    torch_launchers = (ops.perturb_forward, ops.perturb_backward, ops.uap_step)
    launchers = (*chosen.perturb, chosen.sign_step)
    skip_if_same_launchers(backend, launchers, torch_launchers)
    calls = {"perturb forward": lambda launch: launch[0](x, delta),
             "perturb backward": lambda launch: launch[1](grad, x, delta),
             "sign step": lambda launch: launch[2](delta, delta.flip(0), step, eps)}
    check_like_torch(calls[op](launchers), calls[op](torch_launchers), length=BATCH if op == "perturb backward" else 1,
                     name=f"{backend} {op}")
    benchmark.group = f"uap_step: {op}"
    benchmark(lambda: calls[op](launchers))


def unfused_perturbed_linear(x, delta, weight, bias):
    """The ATen computation the fused op replaces: the perturbed batch [K*B, IN] written out, then one
    product per member (+ bias, ReLU) -> [M, K*B, OUT]."""
    inputs = ops.perturb_forward(x, delta).reshape(-1, weight.shape[2])
    return torch.relu(torch.baddbmm(bias.unsqueeze(1), inputs.expand(weight.shape[0], -1, -1), weight.transpose(1, 2)))


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("backend,device", op_backends())
def test_perturbed_linear(benchmark, backend, device, direction):
    x, delta, weight, bias = make_inputs(device)
    delta.requires_grad_()
    chosen = backends.get(backend)
    if backend == "torch":  # the baseline: no fusion
        forward = lambda: unfused_perturbed_linear(x, delta, weight, bias)  # noqa: E731
    else:
        if chosen.perturbed_linear is None:
            pytest.skip(f"no fused perturbed Linear on {backend!r} (Backend.perturbed_linear is None)")
        forward = lambda: ops.perturbed_linear(x, delta, weight, bias, True, chosen)[0]  # noqa: E731
        check_like_torch(forward(), unfused_perturbed_linear(x, delta, weight, bias), length=784,
                         name=f"{backend} forward")
    grad_out = torch.randn(MEMBERS, K * BATCH, HIDDEN, device=device)
    benchmark.group = f"perturbed linear {direction}"
    if direction == "forward":
        benchmark(forward)
    else:  # the backward alone: each round's forward is set-up, outside the timing
        benchmark.pedantic(lambda out: torch.autograd.grad(out, delta, grad_out), setup=lambda: ((forward(),), {}),
                           rounds=20)
