"""Ensembles across processes on ``torch.distributed`` (launched by ``torchrun``: gloo on CPUs, NCCL on GPUs).

An ensemble is the natural unit to spread: ``train``, ``sgd_uap`` and ``evaluate`` place the M members of an
Ensemble over the R ranks in contiguous blocks (the first M mod R ranks hold one member more; M < R is an
error: every rank must hold a member), each rank running its block on the stacked engine. Attacks and
evaluation can also split the data instead (every rank holding the whole model). Every rank is handed the
whole model and gets the whole result back, equal to the single-process one.

What crosses the ranks (all of it through this module's collectives):
- target "members": nothing per step; once per epoch the loss sums and a finiteness flag (one all-reduce),
  and for a checkpoint the members' states (gathered; rank 0 writes the ordinary single-process file);
- target "ensemble": per step ONE all-reduce of the member-logit sums and the projected Jacobian rows
  summed over the rank's members (``sum_across_ranks``); nothing in the backward (see there);
- attacks: the member-logit sums forward and the perturbation gradients backward (members), or the
  gradients and losses of each rank's share of the batch (data).

Faults: every collective waits at most the process group's timeout (``init(timeout=...)``; torch's default
otherwise); a failed or timed-out collective raises ``CommunicationError`` naming the rank and what it was
doing (which all-reduce or gather). On NCCL a timed-out collective is reported by PyTorch's watchdog instead.
File reads and writes happen on rank 0 only (``on_rank0``), and their errors reach every rank, so all ranks
stop together with the same message.
"""
from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastjac.ensemble import Ensemble

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; FASTJAC_DIST_TIMEOUT or init(timeout=) override it
_timeout_s: float | None = None  # the timeout of the group init() created (None: none, or the caller's own)


class CommunicationError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or stopped with an error of its own."""


@dataclass(frozen=True)
class World:
    """This process's place in the initialized process group: ``rank`` of ``size`` ranks."""
    rank: int
    size: int

    def block(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items (members, or a batch's rows): the first
        ``count % size`` ranks take one item more. Empty when count < size."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def current() -> World | None:
    """The initialized process group as a World, or None when there is none or it has a single rank."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return World(dist.get_rank(), dist.get_world_size())


def resolve(setting, modes: tuple[str, ...], what: str) -> tuple[World, str] | None:
    """(world, mode) for the ``distributed=`` argument of ``what`` (train, sgd_uap, evaluate), or None to run
    in this process alone. None: ``modes[0]`` when a process group of more than one rank is initialized;
    False: this process alone even then; a mode name: that mode, which needs an initialized group."""
    if setting is None or setting is False:
        world = current() if setting is None else None
        return None if world is None else (world, modes[0])
    if setting not in modes:
        raise ValueError(f"{what}: distributed must be None, False or one of {', '.join(map(repr, modes))}, "
                         f"got {setting!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{what}: distributed={setting!r} needs an initialized torch.distributed process group "
                         f"(launch with torchrun and call fastjac.distributed.init())")
    world = current()
    return None if world is None else (world, setting)


# ------------------------------------------------------------------------------------------- the group
def init(device: torch.device | str = "cpu", timeout: float | None = None) -> World | None:
    """Join the process group a launcher such as ``torchrun`` described in the environment (env://
    rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), if any: gloo for a CPU ``device``, NCCL for
    CUDA (then this process uses ``cuda:LOCAL_RANK``). Returns the World, or None when the environment
    names no group of more than one process (a plain single-process run).

    ``timeout`` (seconds; default FASTJAC_DIST_TIMEOUT, else 1800) bounds every collective: a rank that dies
    or hangs makes the others raise CommunicationError within it. Under the members target the ranks meet
    only once per epoch, so it must exceed the epoch-time difference between ranks (M not divisible by R).
    """
    global _timeout_s
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if dist.is_initialized():
        return current()
    device = torch.device(device)
    if timeout is None:
        timeout = float(os.environ.get("FASTJAC_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    _timeout_s = timeout
    return current()


def shutdown() -> None:
    """Leave the process group ``init`` joined (a no-op without one, or for a group someone else created)."""
    global _timeout_s
    if _timeout_s is not None and dist.is_initialized():
        dist.destroy_process_group()
    _timeout_s = None


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this rank's GPU (LOCAL_RANK) under a launcher; else ``device``."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


# ------------------------------------------------------------------------------------------ collectives
def _collective(what: str, run):
    """``run()``, with a failure turned into a CommunicationError that says what to look for."""
    try:
        return run()
    except (RuntimeError, dist.DistError) as error:
        limit = f"{_timeout_s:g} s" if _timeout_s is not None else "the process group's timeout"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommunicationError(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: {what} failed: another rank died, stopped "
            f"with an error, or did not arrive within {limit} ({first_line})") from error


def all_reduce_(tensor: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    """Sum ``tensor`` (contiguous) over the ranks, in place; returns it."""
    _collective(what, lambda: dist.all_reduce(tensor))
    return tensor


class _SumAcrossRanks(torch.autograd.Function):
    """Forward: the sum over the ranks of each rank's tensor. Backward: the incoming gradient, unchanged.

    Why no collective in the backward: every rank computes the same (replicated) loss L from the same sum
    S = sum_r s_r, so dL/ds_r = dL/dS, which each rank already holds."""

    @staticmethod
    def forward(ctx, partial, what):
        return all_reduce_(partial.detach().clone(memory_format=torch.contiguous_format), what)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_across_ranks(partial: torch.Tensor, what: str = "all-reduce of the member sums") -> torch.Tensor:
    """sum_r partial_r, differentiable for a loss that every rank computes identically from the result."""
    return _SumAcrossRanks.apply(partial, what)


def gather_blocks(world: World, local: torch.Tensor, count: int, what: str) -> torch.Tensor:
    """The ranks' blocks ``local`` [len(world.block(count)), ...] joined in rank order: [count, ...] on every
    rank (padded to equal sizes for the collective)."""
    widest = len(World(0, world.size).block(count))
    padded = local.new_zeros(widest, *local.shape[1:])
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    _collective(what, lambda: dist.all_gather(parts, padded.contiguous()))
    return torch.cat([part[:len(World(rank, world.size).block(count))] for rank, part in enumerate(parts)])


def on_rank0(world: World | None, run):
    """``run()`` on rank 0 only (file reads and writes); every rank returns its result, or raises the error
    it raised, so that all ranks stop together with the same message. Without a world: ``run()``."""
    if world is None:
        return run()
    outcome = [None]
    if world.is_first:
        try:
            outcome = [(True, run())]
        except Exception as error:  # noqa: BLE001 - handed to every rank, then raised there
            outcome = [(False, _picklable(error))]
    _collective("broadcast from rank 0", lambda: dist.broadcast_object_list(outcome, src=0))
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - an exception type that does not survive pickling
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


# ---------------------------------------------------------------------------------------- member blocks
class MemberBlock:
    """This rank's block of an Ensemble's members as an Ensemble of its own (copies: what the rank runs and
    trains), and the way between its states and the whole ensemble's (every state entry is stacked along
    the member axis)."""

    def __init__(self, model, world: World, what: str):
        if not isinstance(model, Ensemble):
            raise ValueError(f"{what}: spreading members over {world.size} ranks needs an Ensemble, got a "
                             f"{type(model).__name__}; launch one process, or use distributed='data' where offered")
        members = model.num_members
        if members < world.size:
            raise ValueError(f"{what}: an ensemble of {members} members cannot be spread over {world.size} ranks "
                             f"(every rank needs at least one member); launch at most {members} processes")
        self.world, self.model, self.members = world, model, members
        self.indices = world.block(members)
        self.local = Ensemble(model.members()[self.indices.start:self.indices.stop])
        self.local.train(model.training)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor stacked along the members ([M, ...] -> [block, ...])."""
        return tensor[self.indices.start:self.indices.stop]

    def gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        return gather_blocks(self.world, tensor, self.members, what)

    def take_state(self, model_state: dict) -> dict:
        """The whole ensemble's state dict cut to this rank's members."""
        return {name: self.take(tensor) for name, tensor in model_state.items()}

    def take_optimizer_state(self, optimizer_state: dict) -> dict:
        """The whole ensemble's optimizer state dict cut to this rank's members."""
        return _map_optimizer_state(optimizer_state, self.take, self._stacked_shapes(full=True))

    def full_states(self, model_state: dict, optimizer_state: dict) -> tuple[dict, dict]:
        """This rank's state dicts gathered into the whole ensemble's (a collective: every rank calls it)."""
        model_state = {name: self.gather(tensor, "gathering the members' weights")
                       for name, tensor in model_state.items()}
        gather = lambda tensor: self.gather(tensor, "gathering the optimizer state")  # noqa: E731
        return model_state, _map_optimizer_state(optimizer_state, gather, self._stacked_shapes(full=False))

    def write_back(self) -> None:
        """Copy every rank's trained members into the whole ensemble, on every rank (a collective)."""
        state = {name: self.gather(tensor, "gathering the members' weights")
                 for name, tensor in self.local.state_dict().items()}
        self.model.load_state_dict(state)

    def _stacked_shapes(self, full: bool) -> list[tuple]:
        """Shapes of the parameters, in the optimizer's order: whole-ensemble ([M, ...]) or this rank's."""
        source = self.model if full else self.local
        return [tuple(p.shape) for p in source.parameters()]


def _map_optimizer_state(state: dict, apply, shapes: list[tuple]) -> dict:
    """An optimizer state dict with ``apply`` on every per-parameter tensor shaped like its parameter (Adam's
    moments: stacked along the members); scalars such as Adam's step are the same on every rank."""
    mapped = {}
    for index, entry in state["state"].items():
        mapped[index] = {key: (apply(value) if isinstance(value, torch.Tensor) and tuple(value.shape) == shapes[index]
                               else value) for key, value in entry.items()}
    return {"state": mapped, "param_groups": state["param_groups"]}
