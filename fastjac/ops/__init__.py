"""Fused ops of the stacked engine: one module per op, each with plain launchers and an autograd.Function.

An op's other launchers live in parallel rooms where a backend has its own: ``kernels/<op>.py`` (Triton,
for stream_epilogue, stacked_linear and uap_step) and ``csrc/<op>.*`` (C++ for stream_epilogue and
stacked_linear; CUDA for uap_step's sign step only). ``linear_chain`` has no kernels of its own: it
composes ATen products (or the C++ ``stacked_addmm_``, csrc/stacked_matmul.cpp). Each module's
``launchers(backend)`` says which launchers run; ``fastjac.backends`` picks the backend. Arguments are
checked in these modules, once, before any kernel launcher runs.
"""
