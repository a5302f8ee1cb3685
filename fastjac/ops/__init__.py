"""Fused ops of the stacked engine: one module per op, each with plain launchers and an autograd.Function.

Every op mirrors ``kernels/<op>.py`` (Triton) and ``csrc/<op>.*`` (C++/CUDA); ``fastjac.backends`` picks
which launchers run.
"""
