"""Issue 16's acceptance table: hostile and careless inputs against the CLI and the API of one source tree.

    python scripts/reliability_table.py [--tree DIR] [--only NAME ...]

Each case runs in a fresh process (``PYTHONPATH=DIR``, a scratch working directory) and is classified:

- ``clear``: the expected outcome (a one-line error naming what was wrong with the expected exit code or
  exception type, or success where success is right), and no side effect it must not have;
- ``traceback``: a Python traceback, or an exception raised deep inside torch instead of at the boundary;
- ``silent``: no error where one was due, or a wrong side effect (a NaN model written, a file overwritten,
  a fallback to other data, work done after which it fails).

Prints one markdown row per case and the totals. Run it on two trees (before / after a change) to compare.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = sys.executable
MEMORY_LIMIT = 6 * 2**30  # RLIMIT_AS of every case: a hostile file must not take the machine down


@dataclass
class Case:
    name: str
    argv: list[str] | None = None              # a CLI command (after ``python -m fastjac``) ...
    api: str | None = None                     # ... or a Python snippet (prints OK when it returns)
    setup: str = ""                            # Python run first in the scratch directory
    expect_rc: int = 0                         # CLI: the exit code wanted
    expect_text: list[str] = field(default_factory=list)  # substrings wanted in stderr (CLI) / the error (API)
    expect_error: str | None = None            # API: exception class name wanted (None: must return)
    check: str = ""                            # Python run afterwards: prints SILENT: <why> on a bad side effect
    env: dict = field(default_factory=dict)
    interrupt_when: str | None = None          # send SIGINT once this file exists (the run is under way)


SMALL = ["--epochs", "1", "--samples", "256"]
MAKE_MODEL = "import subprocess, sys; subprocess.run([sys.executable, '-m', 'fastjac', 'train', '--epochs', '1', " \
             "'--samples', '256', '--out', 'm.pt'], check=True, capture_output=True)\n"
API_PRELUDE = textwrap.dedent("""
    import warnings, torch, fastjac
    from fastjac import models, Ensemble
    torch.manual_seed(0)
    x, y = fastjac.data.load('fashion-mnist', 'test'); x, y = x[:64], y[:64]
    mlp = models.mlp(); lenet = Ensemble([models.lenet() for _ in range(2)])
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
""")

CASES = [
    # item 1: divergence
    Case("train --lr 1e39 --samples 128 (diverges)", ["train", "--lr", "1e39", "--epochs", "1", "--samples", "128", "--out", "m.pt"], expect_rc=1,
         expect_text=["diverged"], check="import pathlib\nif pathlib.Path('m.pt').exists() or pathlib.Path('m.pt.ckpt').exists(): print('SILENT: wrote a model/checkpoint')"),
    # item 2: evaluate's labels and chunk_size
    Case("evaluate: 5-class model on 10-class labels", ["evaluate", "--model", "five.pt"], expect_rc=2,
         expect_text=["label"], setup="import fastjac._io as io, fastjac.models as m\n"
                                       "io.save_model(m.build('mlp', num_classes=5), 'five.pt', arch='mlp', arch_kwargs={'num_classes': 5})"),
    Case("API evaluate: labels >= classes", api="fastjac.evaluate(mlp, x, torch.full_like(y, 10))",
         expect_error="ValueError", expect_text=["y"]),
    Case("API evaluate: chunk_size=0", api="fastjac.evaluate(mlp, x, y, chunk_size=0)", expect_error="ValueError",
         expect_text=["chunk_size"]),
    Case("API evaluate: chunk_size=2.5", api="fastjac.evaluate(mlp, x, y, chunk_size=2.5)", expect_error="TypeError",
         expect_text=["chunk_size"]),
    # item 3: one UAP format
    Case("evaluate --uap of a bare tensor (old reproduce file)", ["evaluate", "--model", "m.pt", "--uap", "bare.pt"],
         expect_rc=2, expect_text=["bare.pt", "fastjac-uap"],
         setup=MAKE_MODEL + "import torch; torch.save(torch.zeros(2, 1, 28, 28), 'bare.pt')"),
    Case("evaluate --uap of a model file", ["evaluate", "--model", "m.pt", "--uap", "m.pt"], expect_rc=2,
         expect_text=["m.pt", "fastjac-uap"], setup=MAKE_MODEL),
    Case("evaluate --uap: delta beyond its eps", ["evaluate", "--model", "m.pt", "--uap", "big.pt"], expect_rc=2,
         expect_text=["big.pt", "eps"],
         setup=MAKE_MODEL + "import torch; torch.save({'format': 'fastjac-uap/1', 'delta': torch.full((1, 1, 28, 28), 0.5), "
                            "'eps': [0.1], 'targets': [None]}, 'big.pt')"),
    # item 4: checks before the compute, no overwrite of foreign files
    Case("train --backend nope", ["train", "--backend", "nope", *SMALL, "--out", "m.pt"], expect_rc=2,
         expect_text=["nope"], check="import pathlib\nif pathlib.Path('m.pt').exists(): print('SILENT: trained and saved before failing')"),
    Case("train --out an existing directory", ["train", *SMALL, "--out", "adir"], expect_rc=2,
         expect_text=["adir", "directory"], setup="import os; os.mkdir('adir')"),
    Case("train --out notes.txt (not a fastjac file)", ["train", *SMALL, "--out", "notes.txt"], expect_rc=2,
         expect_text=["notes.txt", "--force"], setup="open('notes.txt', 'w').write('my notes')",
         check="import pathlib\nif pathlib.Path('notes.txt').read_bytes() != b'my notes': print('SILENT: overwrote notes.txt')"),
    Case("train --out notes.txt --force", ["train", *SMALL, "--out", "notes.txt", "--force"], expect_rc=0,
         setup="open('notes.txt', 'w').write('my notes')"),
    # /sys refuses new files even to root (chmod 555 would not stop root)
    Case("train --out into an unwritable directory", ["train", *SMALL, "--out", "/sys/fastjac/m.pt"], expect_rc=2,
         expect_text=["/sys", "writ"]),
    Case("attack --out into an unwritable directory", ["attack", "--model", "m.pt", "--epochs", "1", "--samples", "256",
                                                        "--out", "/sys/fastjac/attack"], expect_rc=2,
         expect_text=["/sys", "writ"], setup=MAKE_MODEL),
    Case("attack --out an existing file", ["attack", "--model", "m.pt", "--epochs", "1", "--samples", "256",
                                            "--out", "afile"], expect_rc=2, expect_text=["afile"],
         setup=MAKE_MODEL + "open('afile', 'w').write('x')"),
    Case("reproduce --out an existing file", ["reproduce", "--preset", "smoke", "--out", "afile"], expect_rc=2,
         expect_text=["afile"], setup="open('afile', 'w').write('x')"),
    # item 5: the CLI's error handling
    Case("evaluate --model with a KeyError checkpoint", ["evaluate", "--model", "k.pt"], expect_rc=2,
         expect_text=["k.pt"], setup="import torch; torch.save({'format': 'fastjac-model/1', 'arch': 'mlp'}, 'k.pt')"),
    Case("evaluate --model of a list", ["evaluate", "--model", "l.pt"], expect_rc=2, expect_text=["l.pt"],
         setup="import torch; torch.save([1, 2], 'l.pt')"),
    Case("evaluate --model of a directory", ["evaluate", "--model", "."], expect_rc=2, expect_text=["."]),
    Case("reproduce into a corrupt results.json", ["reproduce", "--preset", "smoke", "--out", "r"], expect_rc=2,
         expect_text=["results.json"], setup="import os; os.mkdir('r'); open('r/results.json', 'w').write('{not json')"),
    Case("train: Ctrl-C", ["train", "--epochs", "50", "--samples", "20000", "--out", "m.pt"], expect_rc=130,
         expect_text=["interrupted; resume with the same command"], interrupt_when="m.pt.ckpt",
         check="import pathlib\nleft = [p.name for p in pathlib.Path('.').glob('.*.tmp')]\n"
               "if left: print('SILENT: temp files left', left)"),
    Case("train: orphan .tmp files from a killed run", ["train", *SMALL, "--out", "m.pt"], expect_rc=0,
         setup="open('.m.pt.abc123.tmp', 'w').write('half'); open('.m.pt.ckpt.def456.tmp', 'w').write('half')",
         check="import pathlib\nleft = [p.name for p in pathlib.Path('.').glob('.*.tmp')]\n"
               "if left: print('SILENT: orphans left', left)"),
    # item 6: a lock on the output
    Case("train while another train holds the same --out", ["train", *SMALL, "--out", "m.pt"], expect_rc=1,
         expect_text=["in use"], setup="import fcntl, os, subprocess, sys, time\n"
         # the holder must not keep the setup's pipes open, or the setup would wait for it to end
         "subprocess.Popen([sys.executable, '-c', \"import fcntl, time; f = open('.m.pt.lock', 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); time.sleep(60)\"], stdout=subprocess.DEVNULL, "
         "stderr=subprocess.DEVNULL); time.sleep(2)"),
    Case("reproduce while another run holds the same --out", ["reproduce", "--preset", "smoke", "--out", "r"],
         expect_rc=1, expect_text=["in use"], setup="import os, subprocess, sys, time\nos.mkdir('r')\n"
         "subprocess.Popen([sys.executable, '-c', \"import fcntl, time; f = open('r/.fastjac.lock', 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); time.sleep(60)\"], stdout=subprocess.DEVNULL, "
         "stderr=subprocess.DEVNULL); time.sleep(2)"),
    # item 7: hostile checkpoints (bounded by RLIMIT_AS here)
    Case("model file claiming hidden=(200000,)", ["evaluate", "--model", "h.pt"], expect_rc=2, expect_text=["h.pt"],
         setup="import torch, fastjac._io as io, fastjac.models as m\nio.save_model(m.build('mlp'), 'h.pt', arch='mlp')\n"
               "r = torch.load('h.pt', weights_only=True); r['arch_kwargs'] = {'hidden': [200000, 200000]}; torch.save(r, 'h.pt')"),
    Case("model file claiming 10^9 members", ["evaluate", "--model", "e.pt"], expect_rc=2, expect_text=["e.pt"],
         setup="import torch, fastjac._io as io, fastjac.models as m\nio.save_model(m.build('mlp'), 'e.pt', arch='mlp')\n"
               "r = torch.load('e.pt', weights_only=True); r['members'] = 10**9; torch.save(r, 'e.pt')"),
    Case("model file with NaN weights", ["evaluate", "--model", "n.pt"], expect_rc=2, expect_text=["n.pt"],
         setup="import torch, fastjac._io as io, fastjac.models as m\nmodel = m.build('mlp')\n"
               "torch.nn.init.constant_(model[1].weight, float('nan'))\nio.save_model(model, 'n.pt', arch='mlp')"),
    # item 8: resume
    Case("resume with fewer --epochs", ["train", "--epochs", "1", "--samples", "256", "--out", "m.pt"], expect_rc=2,
         expect_text=["epoch"], setup="import subprocess, sys; subprocess.run([sys.executable, '-m', 'fastjac', 'train', "
         "'--epochs', '2', '--samples', '256', '--out', 'm.pt'], check=True, capture_output=True)"),
    Case("resume with --arch lenet over an MLP checkpoint", ["train", "--arch", "lenet", *SMALL, "--out", "m.pt"],
         expect_rc=2, expect_text=["m.pt.ckpt"], setup=MAKE_MODEL),
    Case("resume with another --lr", ["train", "--lr", "0.01", *SMALL, "--out", "m.pt"], expect_rc=2,
         expect_text=["lr"], setup=MAKE_MODEL),
    Case("resume with more --epochs", ["train", "--epochs", "2", "--samples", "256", "--out", "m.pt"], expect_rc=0,
         expect_text=["epoch"], setup=MAKE_MODEL),
    # item 9: silent fallbacks and slices
    Case("FASTJAC_DATA at a missing directory", ["evaluate", "--model", "m.pt"], expect_rc=2,
         expect_text=["FASTJAC_DATA"], setup=MAKE_MODEL, env={"FASTJAC_DATA": "/nonexistent/fashion"}),
    Case("FASTJAC_DATA without the test files", ["evaluate", "--model", "m.pt"], expect_rc=2,
         expect_text=["t10k"], env={"FASTJAC_DATA": "half"},
         setup=MAKE_MODEL + "import os, shutil; os.mkdir('half'); shutil.copy('/usr/share/datasets/fashion-mnist/"
                            "train-images-idx3-ubyte.gz', 'half'); shutil.copy('/usr/share/datasets/fashion-mnist/"
                            "train-labels-idx1-ubyte.gz', 'half')"),
    Case("--data-root at a missing directory", ["evaluate", "--model", "m.pt", "--data-root", "/nonexistent"],
         expect_rc=2, expect_text=["/nonexistent"], setup=MAKE_MODEL),
    Case("train --samples -59900", ["train", "--epochs", "1", "--samples", "-59900", "--out", "m.pt"], expect_rc=2,
         expect_text=["samples"]),
    Case("train --samples 0", ["train", "--epochs", "1", "--samples", "0", "--out", "m.pt"], expect_rc=2,
         expect_text=["samples"]),
    Case("attack --samples -5", ["attack", "--model", "m.pt", "--samples", "-5", "--out", "a"], expect_rc=2,
         expect_text=["samples"], setup=MAKE_MODEL),
    Case("train --epochs 0", ["train", "--epochs", "0", "--samples", "256", "--out", "m.pt"], expect_rc=2,
         expect_text=["epochs"]),
    Case("train --batch-size 0", ["train", "--batch-size", "0", *SMALL, "--out", "m.pt"], expect_rc=2,
         expect_text=["batch"]),
    Case("train --members -2", ["train", "--members", "-2", *SMALL, "--out", "m.pt"], expect_rc=2,
         expect_text=["members"]),
    Case("train --nproj 0 --jr-lambda 0.1", ["train", "--nproj", "0", "--jr-lambda", "0.1", *SMALL, "--out", "m.pt"],
         expect_rc=2, expect_text=["nproj"]),
    Case("train --lr -1", ["train", "--lr", "-1", *SMALL, "--out", "m.pt"], expect_rc=2, expect_text=["lr"]),
    Case("attack --target 10", ["attack", "--model", "m.pt", "--target", "10", "--epochs", "1", "--samples", "256",
                                "--out", "a"], expect_rc=2, expect_text=["target"], setup=MAKE_MODEL),
    Case("attack --eps 0", ["attack", "--model", "m.pt", "--eps", "0", "--out", "a"], expect_rc=2,
         expect_text=["eps"], setup=MAKE_MODEL),
    Case("train --device cuda without a GPU", ["train", "--device", "cuda", *SMALL, "--out", "m.pt"], expect_rc=2,
         expect_text=["cuda"]),
    Case("verify --model missing.pt", ["verify", "--model", "missing.pt"], expect_rc=2, expect_text=["missing.pt"]),
    # item 10: errors at the boundary (API)
    Case("API train: LeNet given [B,1,32,32]",
         api="fastjac.train(lenet, (torch.rand(8, 1, 32, 32), y[:8]), epochs=1, progress=False)",
         expect_error="ValueError", expect_text=["data x", "32"]),
    Case("API sgd_uap: LeNet given [B,1,32,32]",
         api="fastjac.sgd_uap(lenet, [(torch.rand(8, 1, 32, 32), y[:8])], eps=0.1)",
         expect_error="ValueError", expect_text=["batch", "32"]),
    Case("API evaluate: LeNet given [B,1,32,32]", api="fastjac.evaluate(lenet, torch.rand(8, 1, 32, 32), y[:8])",
         expect_error="ValueError", expect_text=["x", "32"]),
    Case("API train: float64 batch into a float32 model", api="fastjac.train(mlp, (x.double(), y), epochs=1, progress=False)",
         expect_error="TypeError", expect_text=["float64", "float32"]),
    Case("API sgd_uap: float64 batch into a float32 model",
         api="fastjac.sgd_uap(mlp, [(x.double(), y)], eps=0.1)", expect_error="TypeError", expect_text=["float64"]),
    Case("API evaluate: float64 batch into a float32 model", api="fastjac.evaluate(mlp, x.double(), y)",
         expect_error="TypeError", expect_text=["float64"]),
    Case("API evaluate: inputs in [0, 255] warn once",
         api="with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
             "    fastjac.evaluate(mlp, x * 255, y); fastjac.evaluate(mlp, x * 255, y)\n"
             "assert sum('[0, 1]' in str(m.message) for m in w) == 1, [str(m.message) for m in w]",
         expect_error=None),
    Case("API sgd_uap: a one-shot generator as batches",
         api="fastjac.sgd_uap(mlp, (b for b in batches), eps=0.1, epochs=2)", expect_error="TypeError",
         expect_text=["batches"]),
    Case("API train: jr_lambda=1e39 (overflows float32)",
         api="fastjac.train(mlp, (x, y), epochs=1, jr_lambda=1e39, progress=False)", expect_error="ValueError",
         expect_text=["jr_lambda", "float32"]),
    Case("API train: nproj=10**9", api="fastjac.train(mlp, (x, y), epochs=1, jr_lambda=0.1, nproj=10**9, progress=False)",
         expect_error="ValueError", expect_text=["nproj", "GiB"]),
    Case("API sgd_uap: target >= classes", api="fastjac.sgd_uap(mlp, batches, eps=0.1, target=10)",
         expect_error="ValueError", expect_text=["target"]),
    Case("API train: data on another device than the model",
         api="fastjac.train(mlp, (x.to('meta'), y.to('meta')), epochs=1, progress=False)",
         expect_error="ValueError", expect_text=["device"]),
]


def _prepare_child():
    """Bound the case's memory; let it see Ctrl-C even when this script runs in the background (a shell
    starts background jobs with SIGINT ignored, and children inherit that)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_case(case: Case, tree: Path) -> tuple[str, str]:
    """(verdict, detail) for one case, run in a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="fastjac-case-") as scratch:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", **case.env}
        env.pop("FASTJAC_BACKEND", None)
        if case.setup:
            subprocess.run([PYTHON, "-c", case.setup], cwd=scratch, env={**env, "FASTJAC_DATA": ""} if "FASTJAC_DATA" in case.env
                           else env, check=True, capture_output=True, timeout=600)
        if case.argv is not None:
            command = [PYTHON, "-m", "fastjac", *case.argv]
        else:
            snippet = API_PRELUDE + "try:\n" + textwrap.indent(case.api, "    ") + "\nexcept Exception as e:\n" \
                      "    print('RAISED', type(e).__name__, type(e).__module__, repr(str(e))); raise SystemExit(3)\n" \
                      "print('OK')\n"
            command = [PYTHON, "-c", snippet]
        process = subprocess.Popen(command, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, preexec_fn=_prepare_child)
        if case.interrupt_when is not None:
            deadline = time.monotonic() + 300
            while not (Path(scratch) / case.interrupt_when).exists() and process.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            process.kill()
            return "traceback", "timed out"
        side_effect = ""
        if case.check:
            side_effect = subprocess.run([PYTHON, "-c", case.check], cwd=scratch, env=env, capture_output=True,
                                         text=True).stdout.strip()
    rc = process.returncode
    if case.argv is not None:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if "Traceback (most recent call last)" in stderr:
            return "traceback", f"rc {rc}: {last[:150]}"
        if side_effect:
            return "silent", side_effect[:150]
        if rc == 0 and case.expect_rc != 0:
            return "silent", "exit 0, no error"
        if rc != case.expect_rc or not all(text in stderr for text in case.expect_text):
            return ("silent" if rc == 0 else "unclear"), f"rc {rc} (want {case.expect_rc}): {last[:150]}"
        return "clear", f"rc {rc}: {last[:150]}" if last else f"rc {rc}"
    raised = next((line for line in stdout.splitlines() if line.startswith("RAISED")), None)
    if raised is None:
        if rc != 0:
            return "traceback", stderr.strip().splitlines()[-1][:150] if stderr.strip() else f"rc {rc}"
        return ("clear", "returned") if case.expect_error is None else ("silent", "returned, no error")
    _, kind, module, message = raised.split(" ", 3)
    if kind == "AssertionError":  # the snippet's own check of the behaviour failed
        return "silent", message[:150]
    if case.expect_error is None:
        return "traceback", f"{kind}: {message[:150]}"
    if kind != case.expect_error or not all(text in message for text in case.expect_text):
        return "traceback", f"{module}.{kind}: {message[:150]}"
    return "clear", f"{kind}: {message[:150]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]), help="source tree to test")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of case names to run")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.only is None or any(s in c.name for s in args.only)]
    totals: dict[str, int] = {}
    print("| case | verdict | detail |\n|---|---|---|", flush=True)
    for case in cases:
        verdict, detail = run_case(case, Path(args.tree).resolve())
        totals[verdict] = totals.get(verdict, 0) + 1
        print(f"| {case.name} | {verdict} | {detail.replace('|', '/')} |", flush=True)
    print("\n" + ", ".join(f"{count} {verdict}" for verdict, count in sorted(totals.items())) + f" of {len(cases)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
