"""fastjac on torch.distributed: 2 and 3 CPU ranks (gloo), against the single-process results.

The ranks are spawned here, as ``torchrun`` spawns them (the env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), or by ``torchrun`` itself for the command line. Each launch runs under a hard timeout in a
session of its own, and every process it started is killed when it ends, whatever happened. Run as
``python -m tests.test_distributed OUT`` this file is the rank worker: it runs ``suite`` with the ranks and
saves each rank's results for the tests to compare with ``suite`` run in one process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fastjac
from fastjac import Ensemble, backends, distributed, models
from fastjac.jacobian import logits_and_rows, penalty_and_logits
from fastjac.train import make_optimizer
from tests.helpers import needs_backend

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 150  # a whole launch on this shared 2-core machine; it takes ~20-40 s when quiet
FAULT_TIMEOUT_S = 8     # the collective timeout of the fault tests' ranks

BUILDERS = {  # tiny members: the MLP chain Function, LeNet and a BatchNorm ResNet on the engine, the generic path
    "mlp": lambda: models.mlp(hidden=(16,)),
    "lenet": lambda: models.lenet(channels=(2, 3), hidden=(8,)),
    "resnet": lambda: models.resnet(depth=8, width=2),
    "hardtanh": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 12), nn.Hardtanh(), nn.Linear(12, 10)),
}
# Members-target and ensemble-target runs, float64: every case runs 2 epochs of 3 steps (96 samples, batch 32)
TRAIN_CASES = {
    "members-vjp-mlp-independent": dict(arch="mlp", members=5, jr_lambda=[0.1, 0.0, 0.2, 0.05, 0.1],
                                        jr_mode="vjp", nproj=2, member_data="independent"),
    "members-jvp-lenet": dict(arch="lenet", members=3, jr_lambda=0.1, jr_mode="jvp"),
    "ensemble-vjp-mlp": dict(arch="mlp", members=5, jr_lambda=0.2, jr_target="ensemble", jr_mode="vjp"),
    "ensemble-jvp-mlp": dict(arch="mlp", members=4, jr_lambda=0.2, jr_target="ensemble", jr_mode="jvp", nproj=2),
    "ensemble-vjp-lenet": dict(arch="lenet", members=3, jr_lambda=0.3, jr_target="ensemble", jr_mode="vjp"),
    "ensemble-jvp-lenet": dict(arch="lenet", members=4, jr_lambda=0.3, jr_target="ensemble", jr_mode="jvp"),
    "ensemble-vjp-resnet": dict(arch="resnet", members=3, jr_lambda=0.3, jr_target="ensemble", jr_mode="vjp"),
    "ensemble-exact-mlp": dict(arch="mlp", members=3, jr_lambda=0.2, jr_target="ensemble", jr_mode="exact"),
    "ensemble-plain-mlp": dict(arch="mlp", members=3, jr_lambda=0.0, jr_target="ensemble"),
}
RESUMED_CASE = "ensemble-vjp-mlp"  # resumed by the ranks from a one-epoch single-process checkpoint
SETTINGS = dict(batch_size=32, lr=1e-2, seed=1, progress=False)


# ------------------------------------------------------------------------------------- what the ranks run
def ensemble(arch: str, members: int, seed: int = 0) -> Ensemble:
    torch.manual_seed(seed)
    return Ensemble([BUILDERS[arch]() for _ in range(members)]).double()


def samples(count: int):
    x, y = fastjac.data.load("fashion-mnist", "train")
    return x[:count].double(), y[:count]


def train_case(name: str, epochs: int, spread, checkpoint=None) -> dict:
    case = dict(TRAIN_CASES[name])
    model = ensemble(case.pop("arch"), case.pop("members"))
    result = fastjac.train(model, samples(96), epochs=epochs, checkpoint=checkpoint, distributed=spread, **case,
                           **SETTINGS)
    return {"state": model.state_dict(), "history": [{k: v for k, v in epoch.items() if k != "seconds"}
                                                    for epoch in result.history]}


def suite(directory: Path, spread: bool) -> dict:
    """Every case with the ranks (``spread``: each distributed mode) or in this process alone. The resumed
    case reads and then rewrites ``directory / 'resume.ckpt'``."""
    modes = ("data", "members") if spread else (False,)
    results = {f"train/{name}": train_case(name, 2, None if spread else False) for name in TRAIN_CASES}
    if spread:
        results["resume"] = train_case(RESUMED_CASE, 2, None, checkpoint=directory / "resume.ckpt")
    x, y = samples(94)
    batches = [(x[i:i + 46], y[i:i + 46]) for i in range(0, 94, 46)]  # 46, 46, 2 rows: a rank gets none
    for arch, members in (("mlp", 5), ("lenet", 3)):
        model = ensemble(arch, members, seed=2)
        for mode in modes:
            key = f"{arch}/{mode}" if spread else arch
            uap = fastjac.sgd_uap(model, batches, eps=[0.05, 0.1], target=[None, 3], epochs=2, distributed=mode)
            results[f"uap/{key}"] = {"delta": uap.delta, "losses": uap.losses}
            results[f"evaluate/{key}"] = fastjac.evaluate(model, x, y, uap.delta, chunk_size=40, distributed=mode)
    return results


def worker(directory: Path) -> None:
    world = distributed.init("cpu", timeout=60)
    try:
        torch.save(suite(directory, spread=True), directory / f"rank{world.rank}.pt")
    finally:
        distributed.shutdown()


# ------------------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc: a launcher's workers may sit in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill_all(processes) -> None:
    """SIGKILL each process and everything below it (nothing of a launch may outlive the test)."""
    for process in processes:
        for pid in _descendants(process.pid) + [process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for process in processes:
        process.wait()


def _environment(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    env.pop("FASTJAC_BACKEND", None)
    return env


class Ranks:
    """R rank processes (``command`` each, env:// rendezvous on a free port), killed on leaving the block."""

    def __init__(self, size: int, command: list[str], directory: Path):
        port = free_port()
        self.processes = []
        for rank in range(size):
            env = _environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            self.processes.append(subprocess.Popen(
                command, cwd=ROOT, env=env, start_new_session=True, stdout=open(directory / f"out{rank}.txt", "w"),
                stderr=open(directory / f"err{rank}.txt", "w")))
        self.directory = directory

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _kill_all(self.processes)

    def wait(self, timeout: float) -> list[int]:
        """Each rank's exit code; fails the test if any is still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        codes = []
        for rank, process in enumerate(self.processes):
            try:
                codes.append(process.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} still running after {timeout} s:\n{self.stderr(rank)}")
        return codes

    def stderr(self, rank: int) -> str:
        return (self.directory / f"err{rank}.txt").read_text()


def run_launch(command: list[str], directory: Path, timeout: float = LAUNCH_TIMEOUT_S):
    """Run ``command`` (a launcher such as torchrun) to its end within ``timeout``; kill what it leaves."""
    process = subprocess.Popen(command, cwd=ROOT, env=_environment(), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command)} still running after {timeout} s")
    finally:
        _kill_all([process])
    assert process.returncode == 0, f"{' '.join(command)} failed ({process.returncode}):\n{err[-3000:]}"
    return out


# ----------------------------------------------------------------------------------------- comparisons
def assert_states_close(actual: dict, expected: dict, what: str, rtol: float = 1e-9, atol: float = 1e-12):
    """State dicts (or nested ones) equal within float64 rounding of another summation order."""
    assert actual.keys() == expected.keys(), what
    for name in expected:
        a, e = actual[name], expected[name]
        if isinstance(e, dict):
            assert_states_close(a, e, f"{what}/{name}", rtol, atol)
        elif isinstance(e, torch.Tensor):
            assert a.shape == e.shape and a.dtype == e.dtype, f"{what}/{name}"
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}/{name}: {m}")
        else:
            assert a == e, f"{what}/{name}: {a!r} != {e!r}"


def assert_history_close(actual: list, expected: list, what: str):
    assert [epoch["epoch"] for epoch in actual] == [epoch["epoch"] for epoch in expected], what
    for a, e in zip(actual, expected):
        for key in ("loss", "ce", "penalty"):
            assert a[key] == pytest.approx(e[key], rel=1e-9, abs=1e-12), f"{what}: epoch {e['epoch']} {key}"


# ---------------------------------------------------------------------------------- single-process tests
def test_world_blocks_are_contiguous_and_cover_every_member():
    for size in (1, 2, 3, 4, 7):
        for count in (0, 1, 2, 5, 9, 64):
            blocks = [distributed.World(rank, size).block(count) for rank in range(size)]
            assert [i for block in blocks for i in block] == list(range(count)), (size, count)
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("mode,nproj", [("vjp", 2), ("jvp", 3), ("vjp", -1), ("exact", 1)])
@pytest.mark.parametrize("backend", [pytest.param(name, marks=needs_backend(name)) for name in ("torch", "cpp")])
def test_rows_make_both_targets_penalties(arch, mode, nproj, backend):
    """||mean_m rows_m||^2 is the ensemble target's penalty and ||rows_m||^2 the members target's, with the same
    projections (one generator seed), values and every parameter gradient: what train spreads over ranks.
    (ResNet: BatchNorm in training mode, batch statistics; Hardtanh: the generic torch.func path.)"""
    model = ensemble(arch, 3)
    if mode == "exact":  # the reference's jacrev cannot run BatchNorm's in-place running-statistics update
        model.eval()
    x = samples(5)[0]
    weights = torch.randn(5, 10, dtype=torch.float64)  # a loss that weighs every logit differently
    logits, rows = logits_and_rows(model, x, mode=mode, nproj=nproj, backend=backend,
                                   generator=torch.Generator().manual_seed(4))
    expected = {}
    for target in ("ensemble", "members"):
        expected[target] = penalty_and_logits(model, x, mode=mode, nproj=nproj, target=target, backend=backend,
                                              generator=torch.Generator().manual_seed(4))
    for target, penalty in (("ensemble", rows.mean(0).pow(2).sum()), ("members", rows.pow(2).sum(1))):
        reference_logits, reference_penalty = expected[target]
        torch.testing.assert_close(logits, reference_logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(penalty, reference_penalty, rtol=1e-10, atol=1e-13)
        loss = (logits * weights).sum() + penalty.sum()
        reference_loss = (reference_logits * weights).sum() + reference_penalty.sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)  # rows serve both targets
        reference_grads = torch.autograd.grad(reference_loss, list(model.parameters()))
        for name, g, r in zip(model.names, grads, reference_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13, msg=lambda m: f"{target} {name}: {m}")


def test_chain_rows_function_gradcheck():
    """The chain Function's "rows" output, float64 gradcheck (vjp and jvp)."""
    from fastjac.ops import linear_chain

    torch.manual_seed(0)
    weights = [torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True),
               torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)]
    biases = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True), None]
    x = torch.rand(5, 3, dtype=torch.float64) + 0.1  # away from ReLU kinks at these sizes
    for mode, projections in (("vjp", torch.randn(2, 5, 3, dtype=torch.float64)),
                              ("jvp", torch.randn(2, 5, 3, dtype=torch.float64))):
        spec = linear_chain.ChainSpec(mode, "rows", (True, False), (True, False), 0.3, backends.get("torch"))
        assert torch.autograd.gradcheck(
            lambda w0, b0, w1: linear_chain.chain_penalty(spec, x, projections, [w0, w1], [b0, None]),
            (weights[0], biases[0], weights[1]))


def test_member_blocks_refuse_what_cannot_be_spread():
    """M < R: every rank needs a member (an error, not idle ranks); a single module has no members to spread.
    A block is this rank's members as an Ensemble of their own, with the state cut and restored by member."""
    with pytest.raises(ValueError, match="an ensemble of 3 members cannot be spread over 4 ranks"):
        distributed.MemberBlock(ensemble("mlp", 3), distributed.World(0, 4), "train")
    with pytest.raises(ValueError, match="needs an Ensemble, got a Sequential"):
        distributed.MemberBlock(models.mlp(), distributed.World(1, 2), "sgd_uap")
    model = ensemble("mlp", 5)
    block = distributed.MemberBlock(model, distributed.World(1, 2), "train")
    assert block.local.num_members == 2 and list(block.indices) == [3, 4]
    for name, tensor in block.local.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name][3:5]), name
    taken = block.take_state(model.state_dict())
    assert all(torch.equal(taken[name], tensor[3:5]) for name, tensor in model.state_dict().items())
    optimizer = make_optimizer(model.parameters(), 1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    state = block.take_optimizer_state(optimizer.state_dict())
    for index, parameter in enumerate(model.parameters()):
        full, cut = optimizer.state_dict()["state"][index], state["state"][index]
        assert torch.equal(cut["exp_avg"], full["exp_avg"][3:5]) and torch.equal(cut["step"], full["step"])


def test_distributed_argument_errors():
    model = ensemble("mlp", 2)
    x, y = samples(8)
    with pytest.raises(ValueError, match="needs an initialized torch.distributed process group"):
        fastjac.train(model, (x, y), epochs=1, distributed="members", progress=False)
    with pytest.raises(ValueError, match="distributed must be None, False or one of 'data', 'members'"):
        fastjac.evaluate(model, x, y, distributed="ranks")
    with pytest.raises(ValueError, match="needs an initialized"):
        fastjac.sgd_uap(model, [(x, y)], eps=0.1, distributed="data")


# ------------------------------------------------------------------------------- 2 and 3 ranks: the API
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The suite in this process, and the resumed case's one-epoch checkpoint and its 2- and 3-epoch runs."""
    directory = tmp_path_factory.mktemp("single")
    results = suite(directory, spread=False)
    train_case(RESUMED_CASE, 1, False, checkpoint=directory / "one-epoch.ckpt")
    shutil.copy(directory / "one-epoch.ckpt", directory / "two-epochs.ckpt")
    with pytest.warns(UserWarning, match="written by a run of 1 epochs"):
        train_case(RESUMED_CASE, 2, False, checkpoint=directory / "two-epochs.ckpt")
    results["three-epochs"] = train_case(RESUMED_CASE, 3, False)
    return directory, results


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_equal_one_process(size, single, tmp_path):
    """Members and ensemble targets (MLP chain and LeNet engine, vjp/jvp/exact), SGD-UAP and evaluate in both
    distributed modes, and a resume from a single-process checkpoint: every rank holds the single-process
    result (float64: equal within another summation order's rounding; UAPs and metrics exactly)."""
    directory, expected = single
    shutil.copy(directory / "one-epoch.ckpt", tmp_path / "resume.ckpt")
    with Ranks(size, [sys.executable, "-m", "tests.test_distributed", str(tmp_path)], tmp_path) as ranks:
        codes = ranks.wait(LAUNCH_TIMEOUT_S)
        assert codes == [0] * size, "\n".join(ranks.stderr(rank) for rank in range(size))
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(size)]
    for rank, result in enumerate(results):
        for name in TRAIN_CASES:
            got, want = result[f"train/{name}"], expected[f"train/{name}"]
            assert_states_close(got["state"], want["state"], f"rank {rank} {name}")
            assert_history_close(got["history"], want["history"], f"rank {rank} {name}")
        assert_states_close(result["resume"]["state"], expected[f"train/{RESUMED_CASE}"]["state"], "resumed")
        for arch in ("mlp", "lenet"):
            for mode in ("data", "members"):
                uap, want = result[f"uap/{arch}/{mode}"], expected[f"uap/{arch}"]
                assert torch.equal(uap["delta"], want["delta"]), f"rank {rank} {arch} {mode}: the UAPs differ"
                torch.testing.assert_close(torch.tensor(uap["losses"]), torch.tensor(want["losses"]), rtol=1e-9,
                                           atol=1e-12)
                assert result[f"evaluate/{arch}/{mode}"] == expected[f"evaluate/{arch}"], f"{arch} {mode}"
    for result in results[1:]:  # every rank holds the very same ensembles
        for name in TRAIN_CASES:
            assert_states_close(result[f"train/{name}"]["state"], results[0][f"train/{name}"]["state"], name, 0, 0)

    # rank 0 wrote one ordinary checkpoint: loadable without torch.distributed, equal to the single-process
    # one, and a single-process run resumes it (a different R) to the uninterrupted run's weights
    written = torch.load(tmp_path / "resume.ckpt", weights_only=True)
    reference = torch.load(directory / "two-epochs.ckpt", weights_only=True)
    assert written["epoch"] == 2 and written.keys() == reference.keys()
    assert_states_close(written["model"], reference["model"], "checkpoint model")
    assert_states_close(written["optimizer"], reference["optimizer"], "checkpoint optimizer")
    assert written["config"] == reference["config"]
    with pytest.warns(UserWarning, match="written by a run of 2 epochs"):
        resumed = train_case(RESUMED_CASE, 3, False, checkpoint=tmp_path / "resume.ckpt")
    assert_states_close(resumed["state"], expected["three-epochs"]["state"], "resumed in one process")


# ------------------------------------------------------------------------------- the command line
def _single_cli(arguments: list[str], capsys) -> dict:
    from fastjac.cli import main

    assert main(arguments) == 0
    return json.loads(capsys.readouterr().out)


def _torchrun(arguments: list[str], directory: Path) -> dict:
    out = run_launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "-m", "fastjac", *arguments], directory)
    return json.loads(out)


# CPU ranks (gloo) everywhere: on a GPU host the CLI's default device would be cuda, one GPU per rank
TRAIN_ARGUMENTS = ["train", "--members", "4", "--epochs", "1", "--samples", "300", "--batch-size", "64", "--device", "cpu"]


@pytest.mark.parametrize("target", [["--jr-lambda", "0.1", "0", "0.2", "0.05"],
                                    ["--jr-target", "ensemble", "--jr-lambda", "0.2"]], ids=["members", "ensemble"])
def test_torchrun_train_equals_one_process(target, tmp_path, capsys):
    """Issue 13's acceptance: ``torchrun --nproc-per-node 2 -m fastjac train --members 4`` on this CPU writes the
    checkpoint and model file of the single-process command (float32: within a few float32 roundings)."""
    single = _single_cli([*TRAIN_ARGUMENTS, *target, "--out", str(tmp_path / "one.pt")], capsys)
    spread = _torchrun([*TRAIN_ARGUMENTS, *target, "--out", str(tmp_path / "two.pt")], tmp_path)
    expected = torch.load(tmp_path / "one.pt.ckpt", weights_only=True)
    written = torch.load(tmp_path / "two.pt.ckpt", weights_only=True)
    assert_states_close(written["model"], expected["model"], "model", rtol=1e-4, atol=1e-6)
    assert_states_close(written["optimizer"], expected["optimizer"], "optimizer", rtol=1e-3, atol=1e-8)
    model_file = torch.load(tmp_path / "two.pt", weights_only=True)
    assert_states_close(model_file["state"], expected["model"], "model file", rtol=1e-4, atol=1e-6)
    assert spread["test"]["clean_accuracy"] == pytest.approx(single["test"]["clean_accuracy"], abs=2e-3)
    assert [e["loss"] for e in spread["history"]] == pytest.approx([e["loss"] for e in single["history"]], rel=1e-5)


def test_torchrun_attack_equals_one_process(tmp_path, capsys):
    """``torchrun --nproc-per-node 2 -m fastjac attack`` (each batch split over the ranks; the member split is
    checked in float64 by test_ranks_equal_one_process) fits the single-process UAPs of the same model."""
    model = tmp_path / "model.pt"
    _single_cli([*TRAIN_ARGUMENTS, "--out", str(model)], capsys)
    attack = ["attack", "--model", str(model), "--eps", "0.05", "0.1", "--epochs", "2", "--samples", "300",
              "--device", "cpu"]
    single = _single_cli([*attack, "--out", str(tmp_path / "one")], capsys)
    spread = _torchrun([*attack, "--out", str(tmp_path / "two")], tmp_path)
    expected = torch.load(tmp_path / "one" / "uap.pt", weights_only=True)["delta"]
    delta = torch.load(tmp_path / "two" / "uap.pt", weights_only=True)["delta"]
    # float32 gradients summed in another order: a sign can flip only where a gradient entry is ~0
    differing = (delta != expected).float().mean().item()
    assert differing <= 1e-3, f"{differing:.2%} of the UAP entries differ"
    assert spread["uap_accuracy"] == pytest.approx(single["uap_accuracy"], abs=2e-3)
    assert spread["clean_accuracy"] == single["clean_accuracy"]


# ---------------------------------------------------------------------------------------------- faults
FAULT_ARGUMENTS = ["-m", "fastjac", "train", "--members", "2", "--epochs", "100000", "--samples", "64",
                   "--batch-size", "32", "--timeout", str(FAULT_TIMEOUT_S), "--device", "cpu"]


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_rank_stops_the_others_with_an_error(fault, tmp_path):
    """Rank 1 is killed (SIGKILL), or hangs (SIGSTOP), after the first checkpoint: rank 0 stops with a
    one-line communication error (exit code 1) within the collective timeout, and the last finished epoch's
    checkpoint is intact."""
    out = tmp_path / "model.pt"
    checkpoint = Path(f"{out}.ckpt")
    command = [sys.executable, *FAULT_ARGUMENTS, "--out", str(out)]
    with Ranks(2, command, tmp_path) as ranks:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not checkpoint.exists():
            assert time.monotonic() < deadline, f"no checkpoint after {LAUNCH_TIMEOUT_S} s:\n{ranks.stderr(0)}"
            assert ranks.processes[0].poll() is None, f"rank 0 ended early:\n{ranks.stderr(0)}"
            time.sleep(0.2)
        os.kill(ranks.processes[1].pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            code = ranks.processes[0].wait(FAULT_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {FAULT_TIMEOUT_S + 60} s after rank 1 was {fault}")
        elapsed = time.monotonic() - stopped
    error = ranks.stderr(0)
    assert code == 1, error
    assert "fastjac train: error: rank 0 of 2:" in error and "another rank died" in error, error
    assert "Traceback" not in error, error
    if fault == "hung":
        assert elapsed >= FAULT_TIMEOUT_S * 0.5, f"stopped after {elapsed:.1f} s: before the timeout?"
    saved = torch.load(checkpoint, weights_only=True)  # complete: a torn file would not load
    assert saved["epoch"] >= 1 and len(saved["history"]) == saved["epoch"]
    assert all(torch.isfinite(tensor).all() for tensor in saved["model"].values())


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
