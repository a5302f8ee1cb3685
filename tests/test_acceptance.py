"""The foundation's acceptance on real Fashion-MNIST: an MLP trained 2 epochs reaches >= 85% clean test
accuracy, and a JR-trained MLP (lambda = 0.1) keeps a clearly higher UAP accuracy at eps = 0.1."""
import pytest
import torch

import fastjac
from fastjac import models


@pytest.fixture(scope="module")
def trained(fashion):
    x, y, x_test, y_test = fashion
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 10000, 128)]
    results = {}
    for lam in (0.0, 0.1):
        torch.manual_seed(0)
        model = models.mlp()
        fastjac.train(model, (x, y), epochs=2, jr_lambda=lam, seed=0, progress=False)
        attack = fastjac.sgd_uap(model, batches, eps=0.1, epochs=1)
        results[lam] = fastjac.evaluate(model, x_test, y_test, attack.delta)
    return results


def test_two_epochs_reach_85_percent(trained):
    assert trained[0.0]["clean_accuracy"] >= 0.85


def test_jacobian_regularization_keeps_uap_accuracy(trained):
    # measured: about 0.76 with lambda = 0.1 against 0.44 without; "clearly higher" = 15 points
    assert trained[0.1]["uap_accuracy"][0] >= trained[0.0]["uap_accuracy"][0] + 0.15
