"""The SGD-UAP ops, forward and backward, on every backend against their torch launchers: perturb (K = 4
perturbations of a batch of B = 128 images), the sign step, and the perturbed first Linear of an MLP
(784 -> 256, M = 5), float32."""
import pytest
import torch

from bench.suite import check_like_torch, op_backends, skip_if_same_launchers
from fastjac.ops import uap_step as ops

K, BATCH, MEMBERS, HIDDEN = 4, 128, 5, 256


def make_inputs(device):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, 28, 28, generator=generator)
    delta = (torch.rand(K, 1, 28, 28, generator=generator) - 0.5) * 0.2
    weight = torch.randn(MEMBERS, HIDDEN, 784, generator=generator) / 28
    bias = torch.randn(MEMBERS, HIDDEN, generator=generator)
    return [t.to(device) for t in (x, delta, weight, bias)]


def perturbed_linear_launchers(backend):
    try:
        return ops.perturbed_linear_launchers(backend)
    except ValueError as error:
        pytest.skip(f"no perturbed-linear launchers on {backend!r}: {error}")


@pytest.mark.parametrize("op", ["perturb forward", "perturb backward", "sign step", "perturbed linear forward",
                                "perturbed linear backward"])
@pytest.mark.parametrize("backend,device", op_backends())
def test_uap_op(benchmark, backend, device, op):
    x, delta, weight, bias = make_inputs(device)
    grad_perturbed = torch.randn(K, *x.shape, device=device)
    step, eps = torch.full((K,), 0.02, device=device), torch.full((K,), 0.1, device=device)
    if op.startswith("perturbed linear"):
        torch_launchers, launchers = ops.perturbed_linear_launchers("torch"), perturbed_linear_launchers(backend)
        _, mask = torch_launchers[0](x, delta, weight, bias, True)
        grad_out = torch.randn(MEMBERS, K * BATCH, HIDDEN, device=device)
        calls = {"perturbed linear forward": lambda launch: launch[0](x, delta, weight, bias, True),
                 "perturbed linear backward": lambda launch: launch[1](grad_out, x, delta, weight, mask)}
        length = {"perturbed linear forward": 784, "perturbed linear backward": BATCH * MEMBERS * HIDDEN}[op]
    else:
        torch_launchers, launchers = ops.launchers("torch"), ops.launchers(backend)
        calls = {"perturb forward": lambda launch: launch[0](x, delta),
                 "perturb backward": lambda launch: launch[1](grad_perturbed, x, delta),
                 "sign step": lambda launch: launch[2](delta, delta.flip(0), step, eps)}
        length = BATCH if op == "perturb backward" else 1
    skip_if_same_launchers(backend, launchers, torch_launchers)
    check_like_torch(calls[op](launchers), calls[op](torch_launchers), length=length, name=f"{backend} {op}")
    benchmark.group = f"uap_step: {op}"
    benchmark(lambda: calls[op](launchers))
