#!/usr/bin/env bash
# One command for a GPU host: install fastjac with its extension, run the whole test suite on the GPU,
# verify every backend against the reference on the GPU, benchmark (MLP, LeNet, and the ResNet when
# fastjac.models.ARCHITECTURES has it), run the quick study on the GPU, and append the card, the
# commands and the numbers to bench/RESULTS-gpu.md.
#
# Sized for <= 8 minutes of device time: every step runs under its own limit (seconds, overridable:
# LIMIT_BUILD LIMIT_TESTS LIMIT_VERIFY LIMIT_BENCH LIMIT_STUDY), and BUDGET (seconds, default 480; empty:
# none) caps the whole: a step gets at most what is left of it (less a reserve for the report) and is
# skipped when too little is. A step over its limit is interrupted (SIGINT, so pytest and the study stop
# cleanly; the study resumes on a later run) and recorded as "timed out". A failed step does not stop
# the later ones. Measured on an H200 (bench/RESULTS-gpu.md): the build takes ~50 s with 16 jobs, and the
# whole suite took more than 170 s on 12 workers when each compiled every Triton autotune config it met
# (the suite now keeps one per GEMM kernel: tests/conftest.py); where the lease allows, give the tests
# LIMIT_TESTS=400 and BUDGET=600, or run them alone (STEPS="build tests").
#
# Usage: scripts/gpu_check.sh            env: PYTHON (default python3: a Python whose torch has CUDA,
#        with triton and pytest), FASTJAC_DATA (the Fashion-MNIST IDX files, if not in Debian's path),
#        REPORT (default bench/RESULTS-gpu.md), RUN_DIR (logs and study output, default runs/gpu-check),
#        STEPS (default "build tests verify bench study": the steps to run, in the order given),
#        TEST_JOBS (pytest-xdist workers when it is installed; default min(nproc, 8))
# Exit status: 0 when every step passed, 1 otherwise, 2 when no GPU is visible.
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
REPORT=${REPORT:-bench/RESULTS-gpu.md}
RUN_DIR=${RUN_DIR:-runs/gpu-check}
LIMIT_BUILD=${LIMIT_BUILD:-180}
LIMIT_TESTS=${LIMIT_TESTS:-200}
LIMIT_VERIFY=${LIMIT_VERIFY:-60}
LIMIT_BENCH=${LIMIT_BENCH:-150}
LIMIT_STUDY=${LIMIT_STUDY:-120}
BUDGET=${BUDGET:-480}
STEPS=${STEPS:-build tests verify bench study}
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
unset TRITON_INTERPRET FASTJAC_BACKEND  # kernels compiled for the GPU; the automatic backend choice

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PYTHON (torch with CUDA needed)" >&2
    exit 2
fi
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR"/*.log
failed=0
last_rc=0
summary=()

REPORT_RESERVE=20  # seconds of BUDGET kept for the report

# step NAME LIMIT COMMAND...: run COMMAND under LIMIT seconds (capped by what is left of BUDGET), its
# output in $RUN_DIR/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$BUDGET" ]; then
        local left=$((BUDGET - SECONDS - REPORT_RESERVE))
        if [ "$left" -lt 10 ]; then
            summary+=("| $name | \`$*\` | skipped: BUDGET=${BUDGET}s spent | 0 |")
            echo "gpu_check: $name: skipped (BUDGET spent)"
            failed=1
            last_rc=1
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "gpu_check: $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$RUN_DIR/$name.log" 2>&1
    local rc=$? status
    last_rc=$rc
    case $rc in
        0) status="ok" ;;
        124 | 130 | 137) status="timed out after ${limit}s"; failed=1 ;;
        *) status="failed (exit $rc)"; failed=1 ;;
    esac
    summary+=("| $name | \`$*\` | $status | $((SECONDS - start)) |")
    echo "gpu_check: $name: $status"
}

# The extension imports, and a C++ error in it raises (an extension linked with a static copy of
# libstdc++ crashes instead: setup.py warns of it).
check_extension() {
    step extension 20 "$PYTHON" -c "import fastjac._C as c, fastjac.kernels; print('fastjac._C: CPU ops' + (' and CUDA ops' if c.WITH_CUDA else ' only'))"
    step extension-errors 20 "$PYTHON" -c "import torch, unittest, fastjac._C as c; unittest.TestCase().assertRaises(RuntimeError, c.stacked_addmm_, torch.empty(2, 3, 4), torch.randn(2, 3, 5), torch.randn(2, 6, 4), None, False); print('a C++ error raises RuntimeError')"
}

# --- build: install fastjac editable with its extension in place (the Triton kernels are the package
# fastjac.kernels only once installed; setup.py keeps the CPU ops if the CUDA part fails)
run_build() {
    rm -f fastjac/_C.*.so
    step build "$LIMIT_BUILD" env MAX_JOBS="$CORES" "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e .
    check_extension
    if [ "$last_rc" -ne 0 ]; then  # e.g. a CXX that links libstdc++ statically: once more with PATH's g++/gcc
        rm -f fastjac/_C.*.so
        step build-gxx "$LIMIT_BUILD" env -u LDSHARED -u LDCXXSHARED MAX_JOBS="$CORES" CXX=g++ CC=gcc \
            "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e .
        check_extension
    fi
}

# --- the whole test suite on the GPU (the Triton kernels compiled for this card, not interpreted), on
# pytest-xdist's workers where it is installed, one thread each. The AOT compile test is left to CI
# (CPU-bound, no GPU needed); bench/ needs pytest-benchmark (and addopts' --benchmark-disable does too).
run_tests() {
    local pytest_args=(-q -p no:cacheprovider --maxfail=50 --durations=15 --ignore=tests/test_aot_triton.py)
    if ! "$PYTHON" -c "import pytest_benchmark" 2>/dev/null; then
        pytest_args+=(-o addopts=-ra --ignore=bench)
    fi
    if "$PYTHON" -c "import xdist" 2>/dev/null; then
        pytest_args+=(-n "${TEST_JOBS:-$(( CORES < 8 ? CORES : 8 ))}")
    fi
    step tests "$LIMIT_TESTS" env OMP_NUM_THREADS=1 "$PYTHON" -m pytest "${pytest_args[@]}"
}

# --- every available backend (triton compiled, not interpreted) against the float64 CPU reference
run_verify() {
    step verify "$LIMIT_VERIFY" "$PYTHON" -m fastjac verify --device cuda
}

# --- benchmarks and their targets: MLP, LeNet and the ResNet when the registry has it (M = 5); the
# torch.compile cases are left out (their compiles alone would take minutes of device time)
run_bench() {
    local archs
    archs=$("$PYTHON" -c "import fastjac.models as m; print(' '.join('--arch ' + a for a in ('mlp', 'lenet', 'resnet') if a in m.ARCHITECTURES))")
    # shellcheck disable=SC2086  # $archs is a list of flags
    step bench "$LIMIT_BENCH" "$PYTHON" -m bench.targets --device cuda --quick --members 5 $archs \
        --kinds plain jr_vjp jr_jvp user_vjp user_jvp reference_jr loop infer_stacked infer_loop infer_vmap uap uap_common \
        --out "$RUN_DIR/bench.md"
}

# --- the quick study on the GPU (resumable: a later run continues where this one stopped)
run_study() {
    step study "$LIMIT_STUDY" "$PYTHON" -m fastjac reproduce --preset quick --device cuda --out "$RUN_DIR/study"
}

for name in $STEPS; do
    case $name in
        build | tests | verify | bench | study) ;;
        *) echo "gpu_check: unknown step '$name' in STEPS (known: build tests verify bench study)" >&2; exit 2 ;;
    esac
done
if [[ " $STEPS " != *" build "* ]]; then  # an extension carried or built earlier: say what it holds
    check_extension
fi
for name in $STEPS; do
    "run_$name"
done

# --- the report
{
    echo
    echo "## GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Card: \`$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)\`;"
    echo "$("$PYTHON" -c "import torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')" 2>&1);"
    echo "commit \`${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}\`, \`scripts/gpu_check.sh\` (logs in \`$RUN_DIR\`)."
    echo
    echo "| step | command | status | seconds |"
    echo "|---|---|---|---|"
    printf '%s\n' "${summary[@]}"
    echo
    echo "Tests: \`$(grep -E '(passed|failed|error)' "$RUN_DIR/tests.log" 2>/dev/null | tail -1)\`"
    if grep -qE '^(FAILED|ERROR) ' "$RUN_DIR/tests.log" 2>/dev/null; then
        echo
        echo '```'
        grep -E '^(FAILED|ERROR) ' "$RUN_DIR/tests.log" | cut -c1-300 | head -60
        echo '```'
    fi
    echo
    echo "Verify (worst relative error against the float64 CPU reference):"
    echo
    echo '```'
    grep -E '^\[' "$RUN_DIR/verify.log" 2>/dev/null || tail -5 "$RUN_DIR/verify.log" 2>/dev/null
    echo '```'
    echo
    echo "Benchmarks:"
    echo
    if [ -s "$RUN_DIR/bench.md" ]; then cat "$RUN_DIR/bench.md"; else echo '```'; tail -20 "$RUN_DIR/bench.log" 2>/dev/null; echo '```'; fi
    echo
    echo "Quick study: \`$(tail -3 "$RUN_DIR/study.log" 2>/dev/null | tr '\n' ' ')\`"
    echo
    echo "<details><summary>nvidia-smi</summary>"
    echo
    echo '```'
    nvidia-smi 2>&1
    echo '```'
    echo "</details>"
} >>"$REPORT"
echo "gpu_check: report appended to $REPORT"
exit $failed
