"""setup.py's check of a built extension. setup.py runs setup() when imported, so the function under test
is compiled from its source, with the imports and helpers it uses."""
import ast
import pathlib
import sys

import pytest

SETUP = pathlib.Path(__file__).resolve().parents[1] / "setup.py"

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
