"""Test helpers shared by every test file."""
import pytest
import torch


def needs_backend(name: str):
    """Skip marker for tests of one backend, with the reason it cannot run here (e.g. extension not built)."""
    from fastjac import backends

    reason = backends._why_unavailable(name)
    return pytest.mark.skipif(reason is not None, reason=f"backend {name!r} unavailable: {reason}")


def assert_close(actual, expected, *, rtol, atol, name="value"):
    """torch.testing-style comparison whose failure names the worst index, both values, and NaN/inf mismatches."""
    # Python numbers become float64: a float32 default would round a float64 comparison away
    actual, expected = (v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
                        for v in (actual, expected))
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nonfinite = ~torch.isfinite(a) | ~torch.isfinite(e)
    if nonfinite.any():
        mismatch = nonfinite & ~((a == e) | (torch.isnan(a) & torch.isnan(e)))
        assert not mismatch.any(), (
            f"{name}: NaN/inf disagreement at {mismatch.nonzero()[0].tolist()}: "
            f"{a[mismatch][0].item()} vs {e[mismatch][0].item()}"
        )
    error = (a - e).abs().nan_to_num(0.0)
    allowed = atol + rtol * e.abs().nan_to_num(0.0)
    excess = error - allowed
    if (excess > 0).any():
        worst = int(excess.flatten().argmax())
        index = list(torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else []
        index = [int(i) for i in index]
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {a.numel()} elements differ; worst at {index}: "
            f"{a.flatten()[worst].item():.10g} vs expected {e.flatten()[worst].item():.10g} "
            f"(|diff| {error.flatten()[worst].item():.3g} > allowed {allowed.flatten()[worst].item():.3g})"
        )
