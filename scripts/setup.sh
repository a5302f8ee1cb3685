#!/usr/bin/env bash
# Set up fastjac in .venv/ (idempotent; a re-run takes seconds):
#   torch==2.13.0 (the CPU build on this machine's disk: never an unpinned torch, which would pull a
#   multi-GB CUDA build), the Python dependencies, the C++ extension (rebuilt only when csrc/ or
#   setup.py changed), and Debian's dataset-fashion-mnist when the data is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv/"
    "$PYTHON" -m venv .venv
fi
# A fresh .venv takes ~2.1 GB (triton 1.0 GB, torch 0.75 GB) and pip unpacks through the temp dir: say so
# plainly up front rather than fail half-installed with "No space left on device".
if ! .venv/bin/python -c "import torch, triton" 2>/dev/null; then
    need_mb=3000
    for dir in . "${TMPDIR:-/tmp}"; do
        free_mb=$(df -Pm "$dir" | awk 'NR == 2 {print $4}')
        if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
            echo "setup: ERROR: $free_mb MB free on the filesystem of $dir; installing torch and triton into .venv/ needs about $need_mb MB" >&2
            exit 1
        fi
    done
fi
echo "setup: Python packages"
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    torch==2.13.0 numpy triton pytest pytest-benchmark tqdm matplotlib ninja

# Build against the installed torch (no build isolation: an isolated build would fetch its own torch).
stamp=.venv/.fastjac-build-stamp
digest=$(cat setup.py pyproject.toml csrc/* | sha256sum | cut -d' ' -f1)
build_log=.venv/fastjac-build.log
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || ! .venv/bin/python -c "import fastjac" 2>/dev/null; then
    echo "setup: building fastjac and its C++ extension (a minute or two; log in $build_log)"
    rm -f fastjac/_C.*.so  # a failed build must not leave the previous extension importable
    PATH="$PWD/.venv/bin:$PATH" MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install --verbose --disable-pip-version-check \
        --no-build-isolation --no-deps -e . >"$build_log" 2>&1 || { tail -30 "$build_log"; exit 1; }
    grep -E "^fastjac: " "$build_log" | sed 's/^/setup: /' || true  # setup.py's own lines: what was built
    echo "$digest" > "$stamp"
fi
# Which parts of the extension import: the CPU ops ('cpp' backend) and, with CUDA, the 'cuda' backend's.
parts=$(.venv/bin/python -c "import fastjac._C as c; print('CPU and CUDA ops' if c.WITH_CUDA else 'CPU ops')" 2>/dev/null)
if [ -n "$parts" ]; then
    echo "setup: C++ extension ok: $parts"
    torch_cuda=$(.venv/bin/python -c "import torch; print(torch.version.cuda or '')")
    if [ -n "$torch_cuda" ] && [ "$parts" = "CPU ops" ]; then
        echo "setup: WARNING: torch has CUDA $torch_cuda but the CUDA ops were not built: the 'cuda' backend is unavailable (see $build_log)"
    fi
else
    echo "setup: WARNING: the C++ extension did not build; the 'cpp' and 'cuda' backends are unavailable (see $build_log)"
fi

# Real data, offline: Debian's package, unless FASTJAC_DATA points elsewhere.
fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -z "${FASTJAC_DATA:-}" ] && [ ! -f "$fmnist" ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup: ERROR: Fashion-MNIST is missing and apt-get cannot run here." >&2
        echo "       Install Debian's dataset-fashion-mnist, or set FASTJAC_DATA to a directory with the IDX files." >&2
        exit 1
    fi
fi
echo "setup: done"
