"""Reliability under bad input and faults (issue 16), host syncs out of the hot loops and device-following
generators (issue 12 items 1 and 7), and the CLI's --device (issue 12 item 9).

Every case here failed before its fix: it ended in a traceback, an error after the work, or a silently wrong
result (scripts/reliability_table.py runs the CLI cases against any tree and prints the table)."""
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fastjac
from fastjac import Ensemble, _checks, _io, models
from fastjac.cli import main
from fastjac.experiments import reproduce
from fastjac.verify import verify

TRAIN = importlib.import_module("fastjac.train")  # the package's `train` attribute is the function

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--epochs", "1", "--samples", "128"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """warn_once's memory is per process: each test starts without it."""
    monkeypatch.setattr(_checks, "_warned", set())


@pytest.fixture(scope="module")
def data():
    x, y = fastjac.data.load("fashion-mnist", "test")
    return x[:64].clone(), y[:64].clone()


@pytest.fixture
def model_file(tmp_path):
    """A trained single-MLP model file (the CLI's own output)."""
    path = tmp_path / "m.pt"
    assert main(["train", *SMALL, "--out", str(path)]) == 0
    return path


def error_line(capsys) -> str:
    """The CLI's stderr: exactly one line of error, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def file_record(path) -> dict:
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------------------- item 1: divergence
def test_diverged_training_exits_1_and_writes_nothing(tmp_path, capsys):
    """lr 1e39 on 128 images (one step): the loss of that step is finite, the parameters are not."""
    out = tmp_path / "m.pt"
    assert main(["train", "--lr", "1e39", "--epochs", "1", "--samples", "128", "--out", str(out)]) == 1
    assert "diverged" in error_line(capsys)
    assert not out.exists() and not Path(f"{out}.ckpt").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_divergence_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    """A run that diverges in epoch 2 (a parameter set to inf after the third of four steps) stops there:
    the checkpoint on disk is still epoch 1's."""
    def poisoning_optimizer(params, lr):
        params = list(params)
        optimizer = real_optimizer(params, lr)
        step, steps = optimizer.step, []

        def poisoned_step(*args, **kwargs):
            step(*args, **kwargs)
            steps.append(1)
            if len(steps) == 3:
                with torch.no_grad():
                    params[0][0, 0] = float("inf")

        optimizer.step = poisoned_step
        return optimizer

    real_optimizer = TRAIN.make_optimizer
    monkeypatch.setattr(TRAIN, "make_optimizer", poisoning_optimizer)
    x, y = data
    checkpoint = tmp_path / "c.pt"
    with pytest.raises(FloatingPointError, match="diverged in epoch 2"):
        fastjac.train(models.mlp(hidden=(8,)), (x, y), epochs=2, batch_size=32, checkpoint=checkpoint, progress=False)
    assert file_record(checkpoint)["epoch"] == 1
    assert torch.isfinite(file_record(checkpoint)["model"]["1.weight"]).all()


# -------------------------------------------------------------------------- item 2: evaluate's arguments
def test_evaluate_rejects_labels_beyond_the_models_classes(data):
    x, y = data
    five = models.mlp(hidden=(8,), num_classes=5)
    with pytest.raises(ValueError, match=r"y has labels from 0 to 9; labels must be in \[0, 5\)"):
        fastjac.evaluate(five, x, y)  # Fashion-MNIST labels go to 9


def test_evaluate_cli_rejects_a_model_with_fewer_classes(tmp_path, capsys):
    path = tmp_path / "five.pt"
    _io.save_model(models.build("mlp", num_classes=5), path, arch="mlp", arch_kwargs={"num_classes": 5})
    assert main(["evaluate", "--model", str(path)]) == 2
    assert "labels must be in [0, 5) (the model's classes)" in error_line(capsys)


@pytest.mark.parametrize("chunk_size, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_evaluate_validates_chunk_size(data, chunk_size, error):
    x, y = data
    with pytest.raises(error, match="chunk_size"):
        fastjac.evaluate(models.mlp(hidden=(8,)), x, y, chunk_size=chunk_size)


# ------------------------------------------------------------------------------- item 3: one UAP format
def test_attack_and_evaluate_share_the_uap_format(model_file, tmp_path, capsys):
    out = tmp_path / "attack"
    assert main(["attack", "--model", str(model_file), "--eps", "0.05", "0.1", "--epochs", "1", "--samples", "128",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    record = _io.load_uap(out / "uap.pt")
    assert record["format"] == _io.UAP_FORMAT and record["eps"] == [0.05, 0.1] and record["targets"] == [None, None]
    assert main(["evaluate", "--model", str(model_file), "--uap", str(out / "uap.pt")]) == 0


@pytest.mark.parametrize("content, complaint", [
    (torch.zeros(2, 1, 28, 28), "got Tensor"),                               # what reproduce used to write
    ({"delta": torch.zeros(2, 1, 28, 28)}, "got format None"),               # what attack used to write
    ({"format": _io.UAP_FORMAT, "delta": torch.full((1, 1, 28, 28), 0.5), "eps": [0.1], "targets": [None]},
     "exceeds its eps"),
    ({"format": _io.UAP_FORMAT, "delta": torch.zeros(2, 1, 28, 28), "eps": [0.1], "targets": [None]}, "K = 2"),
])
def test_uap_reader_names_the_file_and_the_format(model_file, tmp_path, capsys, content, complaint):
    path = tmp_path / "u.pt"
    torch.save(content, path)
    assert main(["evaluate", "--model", str(model_file), "--uap", str(path)]) == 2
    line = error_line(capsys)
    assert str(path) in line and complaint in line


def test_a_model_file_is_not_a_uap_file(model_file, capsys):
    assert main(["evaluate", "--model", str(model_file), "--uap", str(model_file)]) == 2
    assert _io.UAP_FORMAT in error_line(capsys)


# ------------------------------------------------------------------- item 4: checks before any compute
@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if training or an attack starts."""
    def forbidden(*args, **kwargs):
        raise AssertionError("compute started before the inputs were checked")

    monkeypatch.setattr(TRAIN, "penalty_and_logits", forbidden)
    monkeypatch.setattr(TRAIN, "make_optimizer", forbidden)
    monkeypatch.setattr(fastjac.uap, "perturbed_logits", forbidden)


def test_unknown_backend_fails_before_training(tmp_path, capsys, no_compute):
    assert main(["train", "--backend", "nope", *SMALL, "--out", str(tmp_path / "m.pt")]) == 2
    assert "nope" in error_line(capsys)
    assert not list(tmp_path.iterdir())


def test_out_that_is_a_directory_fails_before_training(tmp_path, capsys, no_compute):
    assert main(["train", *SMALL, "--out", str(tmp_path)]) == 2
    assert "is a directory" in error_line(capsys)


def test_a_file_fastjac_did_not_write_is_not_overwritten(tmp_path, capsys, no_compute):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert main(["train", *SMALL, "--out", str(notes)]) == 2
    assert "--force" in error_line(capsys)
    assert notes.read_text() == "my notes"


def test_force_overwrites_and_fastjacs_own_files_need_no_force(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert main(["train", *SMALL, "--out", str(notes), "--force"]) == 0
    assert _io.is_model_file(notes)
    capsys.readouterr()
    assert main(["train", "--epochs", "2", "--samples", "128", "--out", str(notes)]) == 0  # resumes its own


def test_attack_refuses_to_overwrite_foreign_files(model_file, tmp_path, capsys, no_compute):
    out = tmp_path / "attack"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert main(["attack", "--model", str(model_file), "--out", str(out)]) == 2
    assert "metrics.json" in error_line(capsys)
    assert main(["attack", "--model", str(model_file), "--out", str(model_file)]) == 2
    assert "not a directory" in error_line(capsys)


def test_unwritable_output_directory_fails_before_training(tmp_path, capsys, no_compute):
    """/sys refuses new files even to root (a chmod-555 directory would not stop root)."""
    try:
        with open("/sys/fastjac-probe", "w"):
            pass
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    assert main(["train", *SMALL, "--out", "/sys/fastjac/m.pt"]) == 2
    assert "cannot write into /sys" in error_line(capsys)


def test_reproduce_checks_its_output_before_loading_data(tmp_path, monkeypatch):
    monkeypatch.setattr(fastjac.experiments.data, "load", lambda *a, **k: pytest.fail("data loaded"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(_io.OutputError, match="not a directory"):
        reproduce(preset="smoke", out=afile, progress=False)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.md").write_text("my notes")
    with pytest.raises(_io.OutputError, match="results.md"):
        reproduce(preset="smoke", out=tmp_path / "r", progress=False)


# ------------------------------------------------------------------------- item 5: the CLI's error handling
@pytest.mark.parametrize("record", [
    {"format": _io.MODEL_FORMAT, "arch": "mlp"},                                  # KeyError before
    {"format": _io.MODEL_FORMAT, "arch": "mlp", "arch_kwargs": {}, "members": 0, "state": {"x": 1}},
    {"format": _io.MODEL_FORMAT, "arch": "vgg", "arch_kwargs": {}, "members": 0, "state": {}},
    [1, 2],
])
def test_crafted_model_files_give_one_line(tmp_path, capsys, record):
    path = tmp_path / "k.pt"
    torch.save(record, path)
    assert main(["evaluate", "--model", str(path)]) == 2
    assert str(path) in error_line(capsys)


def test_a_directory_as_model_file(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path)]) == 2
    assert "is a directory" in error_line(capsys)


def test_corrupt_results_json_is_named_and_kept(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "results.json").write_text("{not json")
    for force in ([], ["--force"]):
        assert main(["reproduce", "--preset", "smoke", "--out", str(out), *force]) == 2
        line = error_line(capsys)
        assert str(out / "results.json") in line and "not valid JSON" in line
        assert (out / "results.json").read_text() == "{not json"


def test_interrupt_removes_the_half_written_file_and_exits_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the model file is being written: no model file, no temporary file."""
    def interrupted(obj, handle):
        handle.write(b"half a model")
        raise KeyboardInterrupt

    out = tmp_path / "m.pt"
    monkeypatch.setattr(_io, "atomic_save", lambda obj, path: _io.atomic_write(path, lambda h: interrupted(obj, h)))
    assert main(["train", *SMALL, "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "fastjac train: interrupted; resume with the same command"
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_ctrl_c_in_a_real_run_exits_130_leaving_a_resumable_checkpoint(tmp_path):
    """SIGINT to a real `train` once its first checkpoint exists: one line, exit 130, no temporary file, and a
    complete checkpoint to resume from (resuming itself is tested in test_train.py)."""
    command = [sys.executable, "-m", "fastjac", "train", "--epochs", "40", "--samples", "4000", "--out", "m.pt"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # a shell starts background jobs with SIGINT ignored: give the child the default disposition back
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not (tmp_path / "m.pt.ckpt").exists() and process.poll() is None:
            threading.Event().wait(0.1)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "fastjac train: interrupted; resume with the same command"
    assert "Traceback" not in err
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "m.pt").exists()
    done = file_record(tmp_path / "m.pt.ckpt")["epoch"]
    assert 1 <= done < 40


def test_orphan_temporary_files_are_removed_on_the_next_start(tmp_path):
    for name in (".m.pt.abc123.tmp", ".m.pt.ckpt.def456.tmp", ".other.xyz.tmp"):
        (tmp_path / name).write_text("half")
    assert main(["train", *SMALL, "--out", str(tmp_path / "m.pt")]) == 0
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [".other.xyz.tmp"]  # not an output of this run


# --------------------------------------------------------------------------- item 6: concurrent runs
def test_a_second_train_into_a_locked_output_says_in_use(tmp_path, capsys):
    out = tmp_path / "m.pt"
    with _io.output_lock(out):
        assert main(["train", *SMALL, "--out", str(out)]) == 1
        assert "in use" in error_line(capsys)
    assert not out.exists()


def test_a_second_reproduce_into_a_locked_directory_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(fastjac.experiments.data, "load", lambda *a, **k: pytest.fail("data loaded"))
    out = tmp_path / "r"
    out.mkdir()
    with _io.output_lock(out):
        with pytest.raises(_io.OutputInUse, match=f"pid {os.getpid()}"):
            reproduce(preset="smoke", out=out, progress=False)


def test_concurrent_writers_never_show_a_reader_invalid_json(tmp_path):
    """The issue's race: two writers of results.json and a reader. A fixed temporary name let one writer
    rename the other's half-written file into place; unique names never do."""
    path = tmp_path / "results.json"
    _io.atomic_write_text(path, json.dumps({"rows": []}))
    stop, bad = threading.Event(), []

    def write(tag):
        for index in range(150):
            _io.atomic_write_text(path, json.dumps({"rows": [tag] * (index % 50) * 40}))

    def read():
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as error:
                bad.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(tag,)) for tag in ("a", "b")]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert not bad and not list(tmp_path.glob(".*.tmp"))


def test_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "m.pt"
    holder = subprocess.run([sys.executable, "-c", f"from fastjac import _io\nwith _io.output_lock({str(out)!r}):\n"
                             f"    import os; os._exit(0)"], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.returncode == 0
    with _io.output_lock(out):  # a killed holder never leaves a stale lock
        pass


# ------------------------------------------------------------------------- item 7: hostile model files
def _hostile(tmp_path, **changes):
    path = tmp_path / "h.pt"
    _io.save_model(models.build("mlp", hidden=(8,)), path, arch="mlp", arch_kwargs={"hidden": [8]})
    record = file_record(path)
    record.update(changes)
    torch.save(record, path)
    return path


@pytest.mark.parametrize("changes, complaint", [
    (dict(arch_kwargs={"hidden": [200000, 200000]}), "do not fit"),   # would allocate 160 GB before the fix
    (dict(arch_kwargs={"hidden": [2**40]}), "ints in"),
    (dict(arch_kwargs={"hidden": [8] * 1000}), "entries"),
    (dict(arch_kwargs={"hidden": [-8]}), "ints in"),
    (dict(arch_kwargs={"widths": [8]}), "does not take"),
    (dict(members=10**9), "members must be"),
    (dict(members=3), "do not fit"),                                   # a single model's tensors
    (dict(arch_kwargs="hidden=8"), "must be a dict"),
])
def test_hostile_model_records_are_refused_before_building(tmp_path, monkeypatch, changes, complaint):
    path = _hostile(tmp_path, **changes)
    built = []
    real_build = models.build
    monkeypatch.setattr(models, "build", lambda *a, **k: built.append(torch.get_default_device())
                        or real_build(*a, **k))
    with pytest.raises(ValueError, match=complaint):
        _io.load_model(path)
    assert all(device.type == "meta" for device in built), "a real model was built from an unchecked record"


def test_nan_weights_are_refused(tmp_path):
    model = models.build("mlp", hidden=(8,))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    path = tmp_path / "n.pt"
    _io.save_model(model, path, arch="mlp", arch_kwargs={"hidden": [8]})
    with pytest.raises(ValueError, match="NaN"):
        _io.load_model(path)


def test_an_ensemble_round_trips(tmp_path):
    ensemble = Ensemble([models.build("mlp", hidden=(8,)) for _ in range(3)])
    path = tmp_path / "e.pt"
    _io.save_model(ensemble, path, arch="mlp", arch_kwargs={"hidden": [8]})
    loaded, record = _io.load_model(path)
    assert record["members"] == 3 and isinstance(loaded, Ensemble)
    for name, tensor in ensemble.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


# ---------------------------------------------------------------------------------------- item 8: resume
def test_resume_with_fewer_epochs_is_refused(tmp_path, capsys):
    out = str(tmp_path / "m.pt")
    assert main(["train", "--epochs", "2", "--samples", "128", "--out", out]) == 0
    capsys.readouterr()
    assert main(["train", "--epochs", "1", "--samples", "128", "--out", out]) == 2
    assert "already trained 2 epochs, more than the 1 asked for" in error_line(capsys)


def test_resume_with_more_epochs_continues_and_says_so(tmp_path, capsys):
    out = str(tmp_path / "m.pt")
    assert main(["train", *SMALL, "--out", out]) == 0
    capsys.readouterr()
    assert main(["train", "--epochs", "2", "--samples", "128", "--out", out]) == 0
    captured = capsys.readouterr()
    assert "warning: resuming" in captured.err and "this run trains to epoch 2" in captured.err
    assert [epoch["epoch"] for epoch in json.loads(captured.out)["history"]] == [1, 2]


@pytest.mark.parametrize("change, named", [(["--arch", "lenet"], "model: checkpoint"), (["--lr", "0.01"], "lr: checkpoint"),
                                           (["--members", "2"], "members: checkpoint")])
def test_resume_with_other_settings_says_what_differs(tmp_path, capsys, change, named):
    out = str(tmp_path / "m.pt")
    assert main(["train", *SMALL, "--out", out]) == 0
    capsys.readouterr()
    assert main(["train", *SMALL, *change, "--out", out]) == 2
    line = error_line(capsys)
    assert named in line and "other settings" in line


@pytest.mark.parametrize("record", [{"epoch": 1}, [1], {"epoch": "1", "model": {}, "optimizer": {}, "config": {},
                                                        "history": []}])
def test_a_foreign_checkpoint_is_named(data, tmp_path, record):
    x, y = data
    checkpoint = tmp_path / "c.pt"
    torch.save(record, checkpoint)
    with pytest.raises(ValueError, match=f"checkpoint {checkpoint} is not a fastjac training checkpoint"):
        fastjac.train(models.mlp(hidden=(8,)), (x, y), epochs=1, checkpoint=checkpoint, progress=False)


# ------------------------------------------------------------------------- item 9: slices and fallbacks
@pytest.mark.parametrize("argv", [["train", "--samples", "-59900", "--out", "m.pt"], ["train", "--samples", "0", "--out", "m.pt"],
                                  ["attack", "--model", "m.pt", "--samples", "-5", "--out", "a"],
                                  ["train", "--epochs", "0", "--out", "m.pt"], ["train", "--batch-size", "0", "--out", "m.pt"],
                                  ["train", "--members", "-2", "--out", "m.pt"], ["train", "--lr", "-1", "--out", "m.pt"],
                                  ["train", "--lr", "nan", "--out", "m.pt"], ["attack", "--model", "m.pt", "--target", "-1",
                                                                                "--out", "a"]])
def test_non_positive_counts_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    flag = next(a for a in argv if a.startswith("--") and a not in ("--out", "--model"))
    assert f"argument {flag}" in capsys.readouterr().err


def test_subset_rejects_non_positive_counts(data):
    from fastjac.experiments import subset

    for count in (0, -59900):
        with pytest.raises(ValueError, match="samples must be >= 1"):
            subset(*data, count, 0)


def test_fastjac_data_at_a_missing_directory_fails(model_file, capsys, monkeypatch):
    monkeypatch.setenv("FASTJAC_DATA", "/nonexistent/fashion")
    assert main(["evaluate", "--model", str(model_file)]) == 2
    assert "FASTJAC_DATA" in error_line(capsys)


# ------------------------------------------------------------------- item 10: errors at the boundary
@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return Ensemble([models.lenet(channels=(2, 3), hidden=(5,)) for _ in range(2)])


def test_lenet_given_32x32_inputs(lenet, data):
    _, y = data
    x32 = torch.rand(8, 1, 32, 32)
    with pytest.raises(ValueError, match=r"data x has sample shape \[1, 32, 32\].*\[B, 1, 28, 28\]"):
        fastjac.train(lenet, (x32, y[:8]), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"batch 0 x has sample shape \[1, 32, 32\]"):
        fastjac.sgd_uap(lenet, [(x32, y[:8])], eps=0.1)
    with pytest.raises(ValueError, match=r"x has sample shape \[1, 32, 32\]"):
        fastjac.evaluate(lenet, x32, y[:8])


def test_float64_batch_into_a_float32_model(lenet, data):
    x, y = data
    message = "is float64 but the model's parameters are float32"
    with pytest.raises(TypeError, match="data x " + message):
        fastjac.train(lenet, (x.double(), y), epochs=1, progress=False)
    with pytest.raises(TypeError, match="batch 0 x " + message):
        fastjac.sgd_uap(lenet, [(x.double(), y)], eps=0.1)
    with pytest.raises(TypeError, match="x " + message):
        fastjac.evaluate(lenet, x.double(), y)


def test_inputs_on_another_device_than_the_model(data):
    x, y = data
    with pytest.raises(ValueError, match="data x is on meta but the model's parameters are on cpu"):
        fastjac.train(models.mlp(hidden=(8,)), (x.to("meta"), y.to("meta")), epochs=1, progress=False)
    with pytest.raises(ValueError, match="y is on meta but the inputs are on cpu"):
        fastjac.evaluate(models.mlp(hidden=(8,)), x, y.to("meta"))


def test_inputs_outside_the_unit_interval_warn_once(data):
    x, y = data
    model = models.mlp(hidden=(8,))
    with pytest.warns(UserWarning, match=r"outside \[0, 1\]") as record:
        fastjac.evaluate(model, x * 255, y)
        fastjac.evaluate(model, x * 255, y)
        fastjac.sgd_uap(model, [(x * 255, y)], eps=0.1, epochs=1)
    assert sum("[0, 1]" in str(w.message) for w in record) == 2  # one for x, one for batches x


def test_one_shot_generator_as_batches(data):
    x, y = data
    with pytest.raises(TypeError, match="batches must be re-iterable.*generator"):
        fastjac.sgd_uap(models.mlp(hidden=(8,)), ((x, y) for _ in range(2)), eps=0.1, epochs=2)


def test_batches_that_change_between_epochs(data):
    x, y = data

    class Shrinking:
        """Three batches in its first two complete passes (the check, epoch 1), then one."""
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            yield from [(x[:32], y[:32])] * (3 if self.passes < 2 else 1)
            self.passes += 1

    with pytest.raises(ValueError, match="yielded 3 batches when checked but 1 in epoch 2"):
        fastjac.sgd_uap(models.mlp(hidden=(8,)), Shrinking(), eps=0.1, epochs=2)


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2**70, ValueError), (1.5, TypeError)])
def test_seed_is_checked(data, seed, error):
    with pytest.raises(error, match="seed must be"):
        fastjac.train(models.mlp(hidden=(8,)), data, epochs=1, seed=seed, progress=False)


def test_jr_lambda_overflowing_float32(data):
    with pytest.raises(ValueError, match=r"jr_lambda = 1e\+39 overflows float32"):
        fastjac.train(models.mlp(hidden=(8,)), data, epochs=1, jr_lambda=1e39, progress=False)


def test_huge_nproj_says_how_much_memory(data):
    with pytest.raises(ValueError, match=r"nproj = 1000000000 needs at least [\d.e+]+ GiB.*lower nproj"):
        fastjac.train(models.mlp(hidden=(8,)), data, epochs=1, jr_lambda=0.1, nproj=10**9, progress=False)


def test_sgd_uap_labels_beyond_the_models_classes(data):
    """Checked in the pass before the attack (on a GPU, CE with such a label is a device-side assert)."""
    x, y = data
    bad = y[32:].clone()
    bad[3] = 10
    with pytest.raises(ValueError, match=r"batch 1 y has labels from \d+ to 10; labels must be in \[0, 10\)"):
        fastjac.sgd_uap(models.mlp(hidden=(8,)), [(x[:32], y[:32]), (x[32:], bad)], eps=0.1)


def test_target_beyond_the_models_classes(data):
    with pytest.raises(ValueError, match="target must be a class index < 10"):
        fastjac.sgd_uap(models.mlp(hidden=(8,)), [data], eps=0.1, target=10)


# ---------------------------------------------------------------- issue 12 item 7: no host sync per step
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@pytest.fixture
def count_syncs(monkeypatch):
    """Counts the calls that read a tensor's value back to the host (a device sync on a GPU)."""
    calls = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return calls


@pytest.mark.parametrize("jr_lambda", [0.0, 0.1])
def test_train_syncs_once_per_epoch_not_per_step(data, count_syncs, jr_lambda):
    x, y = data
    counts = []
    for steps in (2, 8):
        count_syncs.clear()
        fastjac.train(Ensemble([models.mlp(hidden=(8,)) for _ in range(2)]), (x[:8 * steps], y[:8 * steps]),
                      epochs=2, batch_size=8, jr_lambda=jr_lambda, progress=False)
        counts.append(len(count_syncs))
    assert counts[0] == counts[1], f"syncs grow with the steps: {counts}"
    more_epochs = []
    for epochs in (1, 3):
        count_syncs.clear()
        fastjac.train(models.mlp(hidden=(8,)), (x[:16], y[:16]), epochs=epochs, batch_size=8, progress=False)
        more_epochs.append(len(count_syncs))
    assert more_epochs[1] - more_epochs[0] == 2, f"one sync per epoch expected: {more_epochs}"


def test_sgd_uap_syncs_a_constant_number_of_times(data, count_syncs):
    x, y = data
    model = Ensemble([models.mlp(hidden=(8,)) for _ in range(2)])
    counts = []
    for batches, epochs in ((2, 1), (8, 3)):
        count_syncs.clear()
        fastjac.sgd_uap(model, [(x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]) for i in range(batches)],
                        eps=[0.1, 0.2], target=[None, 3], epochs=epochs)
        counts.append(len(count_syncs))
    assert counts[0] == counts[1] <= 3, counts


def test_evaluate_syncs_once_whatever_the_chunks(data, count_syncs):
    x, y = data
    model = Ensemble([models.mlp(hidden=(8,)) for _ in range(2)])
    delta = torch.zeros(2, 1, 28, 28)
    counts = []
    for chunk_size in (64, 4):
        count_syncs.clear()
        fastjac.evaluate(model, x, y, delta, chunk_size=chunk_size)
        counts.append(len(count_syncs))
    assert counts[0] == counts[1], counts


# ----------------------------------------------------------- issue 12 item 1: generators follow the data
def test_projection_generator_is_on_the_data_device_and_not_the_order_generator(data, monkeypatch):
    seen = []
    real = TRAIN.penalty_and_logits

    def spy(model, x, **kwargs):
        seen.append((kwargs["generator"], x.device))
        return real(model, x, **kwargs)

    order_generators = []
    real_epoch_generator = TRAIN.epoch_generator
    monkeypatch.setattr(TRAIN, "epoch_generator",
                        lambda *a: order_generators.append(real_epoch_generator(*a)) or order_generators[-1])
    monkeypatch.setattr(TRAIN, "penalty_and_logits", spy)
    fastjac.train(models.mlp(hidden=(8,)), data, epochs=1, batch_size=32, jr_lambda=0.1, progress=False)
    assert seen and all(generator.device == device for generator, device in seen)
    assert all(generator is not order for generator, _ in seen for order in order_generators)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("jr_mode", ["vjp", "jvp"])
def test_jr_training_runs_on_cuda(data, jr_mode):
    """Before: a CPU generator handed to torch.randn for CUDA tensors failed at step 1."""
    x, y = (t.cuda() for t in data)
    model = Ensemble([models.mlp(hidden=(8,)) for _ in range(2)]).cuda()
    result = fastjac.train(model, (x, y), epochs=1, batch_size=32, jr_lambda=0.1, jr_mode=jr_mode, progress=False)
    assert result.history[0]["penalty"] > 0


@needs_cuda
def test_cli_on_cuda(tmp_path, capsys):
    model = str(tmp_path / "m.pt")
    assert main(["train", *SMALL, "--jr-lambda", "0.1", "--device", "cuda", "--out", model]) == 0
    assert main(["attack", "--model", model, "--epochs", "1", "--samples", "128", "--device", "cuda",
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["evaluate", "--model", model, "--uap", str(tmp_path / "a" / "uap.pt"), "--device", "cuda"]) == 0


# ------------------------------------------------------------------------ issue 12 item 9: --device, --arch
@pytest.mark.parametrize("device, complaint", [("tpu", "not a device"), ("meta", "cpu or cuda"),
                                               ("cuda:7", "CUDA device")])
def test_device_option_is_checked(tmp_path, capsys, device, complaint):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this host has 8 GPUs")
    assert main(["train", *SMALL, "--device", device, "--out", str(tmp_path / "m.pt")]) == 2
    assert complaint in error_line(capsys)


def test_device_cpu_runs_every_command(tmp_path, capsys):
    model = str(tmp_path / "m.pt")
    assert main(["train", *SMALL, "--device", "cpu", "--out", model]) == 0
    assert main(["attack", "--model", model, "--epochs", "1", "--samples", "128", "--device", "cpu",
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["evaluate", "--model", model, "--device", "cpu"]) == 0
    capsys.readouterr()
    report = verify(names=["torch"], dtypes=(torch.float64,), device="cpu", out=sys.stderr)
    assert max(report["backends"]["torch"]["float64"].values()) < 1e-10


@pytest.mark.parametrize("command", ["train", "attack", "evaluate", "reproduce", "verify"])
def test_every_command_takes_device(command):
    from fastjac.cli import _parser

    subparsers = next(a for a in _parser()._actions if a.dest == "command").choices
    options = {option for action in subparsers[command]._actions for option in action.option_strings}
    assert "--device" in options


def test_arch_choices_come_from_the_registry():
    from fastjac.cli import _parser

    subparsers = next(a for a in _parser()._actions if a.dest == "command").choices
    for command in ("train", "reproduce", "verify"):
        arch = next(a for a in subparsers[command]._actions if a.dest == "arch")
        assert list(arch.choices) == list(models.ARCHITECTURES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_answers_like_isfinite(dtype):
    """The one-reduction finiteness check: NaN and inf of either sign found anywhere, both infinities at
    once (their sum is NaN), and finite values whose sum overflows still count as finite."""
    big = torch.finfo(dtype).max
    cases = {"finite": torch.rand(7, 5, dtype=dtype), "overflowing sum": torch.full((4,), big, dtype=dtype)}
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
        bad = torch.rand(7, 5, dtype=dtype)
        bad[3, 2] = value
        cases[name] = bad
    both = torch.rand(6, dtype=dtype)
    both[1], both[4] = float("inf"), float("-inf")
    cases["inf and -inf"] = both
    for name, x in cases.items():
        assert _checks.all_finite(x) == bool(torch.isfinite(x).all()), name
