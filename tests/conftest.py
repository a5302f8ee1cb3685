"""Shared test set-up: seeds and the Triton interpreter on CPU-only machines (assert helper: tests/helpers.py)."""
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests run with the automatic backend choice unless a test names one.
os.environ.pop("FASTJAC_BACKEND", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

