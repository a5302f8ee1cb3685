"""conv_transpose's methods for a stride-1 convolution's input gradient (ATen's transposed convolution, a
forward convolution with the flipped kernel, a product and a column sum) beside the layer's forward, at the shapes of
bench/RESULTS.md's table (LeNet / branchy, ResNet-8, a CIFAR first layer), B = 128, float32, CPU. Each
method's value is checked against ATen's first. ``pytest bench/bench_conv_transpose.py --benchmark-enable``
times them; ``conv_transpose.transpose_method`` makes the same comparison once per configuration."""
import pytest
import torch
import torch.nn.functional as F

from fastjac.ops import conv_transpose
from tests.helpers import assert_close

# name -> (CIN, COUT, kernel, padding, size)
SHAPES = {"lenet conv1": (1, 6, 5, 2, 28), "branchy block": (6, 6, 3, 1, 14), "lenet conv2": (6, 16, 5, 0, 14),
          "resnet stem": (1, 16, 3, 1, 28),
          "resnet 16": (16, 16, 3, 1, 28), "resnet 64": (64, 64, 3, 1, 7), "cifar conv1": (3, 16, 3, 1, 32)}


@pytest.mark.parametrize("call", ["forward", *conv_transpose.METHODS])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_conv_transpose(benchmark, shape, call):
    cin, cout, kernel, padding, size = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, cin, size, size, generator=generator)
    weight = torch.randn(cout, cin, kernel, kernel, generator=generator)
    g = torch.randn(F.conv2d(x, weight, padding=padding).shape, generator=generator)
    pair = (padding, padding)
    if call == "forward":
        fn = lambda: F.conv2d(x, weight, None, 1, pair)  # noqa: E731
    else:
        fn = lambda: conv_transpose.transpose_forward(g, weight, pair, (1, 1), call)  # noqa: E731
        expected = F.conv_transpose2d(g, weight, None, 1, pair)
        assert_close(fn(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()), name=f"{call} transpose")
    benchmark.group = f"conv_transpose, {shape}"
    with torch.no_grad():
        benchmark(fn)
