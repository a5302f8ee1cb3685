"""The autograd engine's two private queries that fastjac's Functions ask during a backward call:

    torch._C._will_engine_execute_node(node)   whether the running backward call executes ``node`` (torch
                                               refuses a leaf's AccumulateGrad inside autograd.grad)
    torch._C._current_graph_task_id()          which backward call is running

torch's own ``register_multi_grad_hook`` uses both (torch >= 2.0). ``AVAILABLE`` is False where either is
missing; each caller then does what it would do without the answer.
"""
import torch

AVAILABLE = hasattr(torch._C, "_will_engine_execute_node") and hasattr(torch._C, "_current_graph_task_id")
