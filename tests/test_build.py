"""setup.py's check of a built extension (setup.py runs setup() when imported, so the function under test
is compiled from its source, with the imports and helpers it uses), and scripts/setup.sh's disk check."""
import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

SETUP = pathlib.Path(__file__).resolve().parents[1] / "setup.py"
SETUP_SH = SETUP.parent / "scripts" / "setup.sh"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the check reads ldd (Linux)")


def setup_function_named(name: str):
    tree = ast.parse(SETUP.read_text())
    kept = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
            or (isinstance(node, ast.FunctionDef) and node.name in (name, "_say"))]
    namespace: dict = {}
    exec(compile(ast.Module(kept, type_ignores=[]), str(SETUP), "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("listing, warned", [
    ("libstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x1)\\nlibc.so.6 => /lib/libc.so.6 (0x2)", False),
    ("libgomp.so.1 => /lib/x86_64-linux-gnu/libgomp.so.1 (0x1)\\nlibc.so.6 => /lib/libc.so.6 (0x2)", True),
], ids=["shared libstdc++", "static copy"])
def test_an_extension_without_shared_libstdcxx_is_named(listing, warned, tmp_path, monkeypatch, capsys):
    ldd = tmp_path / "ldd"
    ldd.write_text(f"#!/bin/sh\nprintf '{listing}\\n'\n")
    ldd.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")
    setup_function_named("_warn_on_static_libstdcxx")(["fastjac/_C.so"])
    err = capsys.readouterr().err
    assert ("links no shared libstdc++" in err and "'/opt/gcc/bin/g++'" in err and "CXX=g++" in err) == warned, err


@pytest.mark.parametrize("free_mb, refused", [(500, True), (100_000, False)], ids=["full disk", "room"])
def test_setup_sh_names_a_full_disk_before_installing(free_mb, refused, tmp_path):
    """A fresh .venv needs ~2.1 GB: on a disk without room setup.sh says so before pip starts (a CI run once
    failed half-installed with "No space left on device"); with room it goes on to pip (here a fake venv
    whose python fails, so the run stops there either way)."""
    repo, fakes = tmp_path / "repo", tmp_path / "bin"
    (repo / "scripts").mkdir(parents=True)
    fakes.mkdir()
    shutil.copy(SETUP_SH, repo / "scripts")
    (fakes / "df").write_text("#!/bin/sh\necho 'Filesystem 1M-blocks Used Available Capacity Mounted on'\n"
                              f"echo 'fake 999999 1 {free_mb} 1% /'\n")
    # "python3 -m venv .venv" makes a venv whose python has nothing installed (every call fails)
    (fakes / "python3").write_text("#!/bin/sh\nmkdir -p .venv/bin\nprintf '#!/bin/sh\\nexit 1\\n' > .venv/bin/python\n"
                                   "chmod +x .venv/bin/python\n")
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fakes}{os.pathsep}{os.environ['PATH']}", PYTHON=str(fakes / "python3"))
    run = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    named = f"{free_mb} MB free" in run.stderr and "needs about" in run.stderr
    assert named == refused, run.stdout + run.stderr
    assert ("setup: Python packages" in run.stdout) == (not refused), run.stdout
