"""``fastjac.verify``: each backend on its own device, against one float64 CPU reference."""
import pytest
import torch

from fastjac import verify as verify_module
from fastjac.verify import backend_device, verify
from tests.helpers import needs_backend

GPU = torch.cuda.is_available()


@pytest.mark.parametrize("name, requested, expected", [
    ("cpp", "cuda", "cpu"), ("cpp", "cpu", "cpu"),
    ("cuda", "cpu", "cuda"), ("cuda", "cuda:1", "cuda:1"),
    ("torch", "cpu", "cpu"), ("torch", "cuda:1", "cuda:1"),
    ("triton", "cpu", "cuda" if GPU else "cpu"), ("triton", "cuda:1", "cuda:1" if GPU else "cpu"),
])
def test_backend_device(name, requested, expected):
    assert backend_device(name, requested) == torch.device(expected)


def test_backend_device_default_is_cuda_when_available():
    assert backend_device("torch") == torch.device("cuda" if GPU else "cpu")


@needs_backend("cpp")
def test_verify_runs_each_backend_on_its_device():
    """Asked for a CUDA device, the cpp backend still runs on the CPU (it would fail anywhere else), and
    both dtypes agree with the float64 reference: float64 to rounding, float32 to float32's error."""
    report = verify(names=["cpp", "torch"], device="cuda" if GPU else "cpu", batch=2, members=2)
    assert report["backends"]["cpp"]["device"] == "cpu"
    assert report["backends"]["torch"]["device"] == ("cuda" if GPU else "cpu")
    for results in report["backends"].values():
        assert max(results["float64"].values()) < 1e-12
        # float32 against float64: a few hundred products per output, each rounding at 2**-24
        assert max(results["float32"].values()) < 1e-4


def test_verify_reports_errors_that_exist(monkeypatch):
    """The comparison can fail: a backend whose logits are off by 1e-3 shows an error of that size."""
    real = verify_module.Ensemble.member_logits

    def off(self, x, *args, **kwargs):
        return real(self, x, *args, **kwargs) * (1 + 1e-3)

    monkeypatch.setattr(verify_module.Ensemble, "member_logits", off)
    report = verify(names=["torch"], device="cpu", batch=2, members=2, dtypes=(torch.float64,))
    assert report["backends"]["torch"]["float64"]["logits"] == pytest.approx(1e-3, rel=1e-6)


def test_verify_resnet_in_eval_mode():
    """BatchNorm members are compared in eval mode (the ensemble too): before, the ensemble ran train-mode
    BatchNorm against an eval-mode reference, and the reference's jvp crashed on the running statistics."""
    import io

    report = verify(arch="resnet", names=["torch"], dtypes=(torch.float64,), device="cpu",
                                   out=io.StringIO())
    errors = report["backends"]["torch"]["float64"]
    assert max(errors.values()) < 1e-10, errors
