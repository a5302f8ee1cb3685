"""Triton kernels, one module per fused op, mirroring fastjac/ops (installed as fastjac.kernels)."""
