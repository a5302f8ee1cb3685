"""fastjac: kernel-accelerated Jacobian Ensembles.

Ensembles of Jacobian-regularized networks (Co et al. 2022) trained and attacked with universal
adversarial perturbations, on a stacked engine that runs all members, the primal batch and the
random-projection streams in one pass per layer. See DESIGN.md for the method.
"""
from fastjac import backends, data, models, reference
from fastjac.memory import keep_freed_memory
from fastjac.ensemble import Ensemble
from fastjac.jacobian import JacobianReg, jacobian_penalty
from fastjac.metrics import evaluate
from fastjac.train import train
from fastjac.uap import sgd_uap

__version__ = "0.1.0"
__all__ = ["Ensemble", "JacobianReg", "backends", "data", "evaluate", "jacobian_penalty", "keep_freed_memory", "models",
           "reference", "sgd_uap", "train"]
