"""scripts/gpu_check.sh cannot run here (no GPU), but its commands must at least parse: every
``python -m fastjac ...`` and ``python -m bench.targets ...`` line's flags against the real parsers (a
flag renamed or removed would otherwise be found on the first GPU host, after minutes of device time)."""
import re
import shlex
from pathlib import Path

import pytest

from fastjac import benchmark, cli

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _commands():
    text = SCRIPT.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        match = re.search(r'"\$PYTHON" -m (fastjac|bench\.targets) (.*)$', line)
        if match:
            args = []
            for arg in shlex.split(match.group(2)):
                # shell variables: $archs is a list of --arch flags, any other stands for one value
                args += ["--arch", "mlp"] if arg == "$archs" else ["value" if "$" in arg else arg]
            yield match.group(1), args


def test_the_script_has_commands():
    assert {module for module, _ in _commands()} == {"fastjac", "bench.targets"}


@pytest.mark.parametrize("module,args", list(_commands()), ids=lambda value: str(value)[:40])
def test_gpu_check_commands_parse(module, args):
    """Each command's flags exist (argparse exits with status 2 on an unknown flag)."""
    if module == "fastjac" and args[0] == "bench":  # cli.main hands 'bench' to the benchmark's own parser
        benchmark.make_parser().parse_args(args[1:])
    elif module == "fastjac":
        cli._parser().parse_args(args)
    else:
        parser = benchmark.make_parser("python -m bench.targets")
        parser.add_argument("--profile-misses", action="store_true")
        parser.parse_args(args)
