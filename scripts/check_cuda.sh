#!/usr/bin/env bash
# Compile-check every csrc/*.cu with nvcc (no GPU needed): one line per file, non-zero exit on any failure.
# Usage: scripts/check_cuda.sh [extra nvcc flags...]   (env: NVCC, default nvcc; CUDA_ARCH, default sm_90)
set -u
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
ARCH="${CUDA_ARCH:-sm_90}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "check_cuda: $NVCC not found on PATH" >&2
    exit 2
fi
shopt -s nullglob
sources=(csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
    echo "check_cuda: no csrc/*.cu files" >&2
    exit 2
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failed=0
for source in "${sources[@]}"; do
    log="$tmp/$(basename "$source").log"
    if "$NVCC" -std=c++17 -arch="$ARCH" -Icsrc -c "$source" -o "$tmp/$(basename "$source").o" "$@" >"$log" 2>&1; then
        echo "ok    $source"
    else
        echo "FAIL  $source"
        sed 's/^/      /' "$log"
        failed=1
    fi
done
exit $failed
